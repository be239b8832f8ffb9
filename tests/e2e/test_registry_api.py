"""The registry's API as callers use it, through the gateway: uploads that must leave
nothing behind, tamper evidence, compare-and-set alias moves, and the change feed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import grpc
import pytest
from tensorgate import AsyncGatewayClient
from tensorgate.errors import DataLossError, FailedPreconditionError
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc
from tensorgate.registry_client import AsyncRegistryClient

from tests.conftest import RegistryStack
from tests.helpers import refused_upload

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "repository" / "digits"


def _digits_copy(tmp_path: Path, marker: bytes) -> Path:
    """The digits model with one file of its own, so its artifact is unlike any other."""
    folder = tmp_path / f"digits-{marker.hex()}"
    (folder / "1").mkdir(parents=True)
    for item in (DIGITS / "1").iterdir():
        if item.is_file():
            (folder / "1" / item.name).write_bytes(item.read_bytes())
    (folder / "1" / "marker.bin").write_bytes(marker)
    (folder / "config.pbtxt").write_text((DIGITS / "config.pbtxt").read_text())
    return folder


def _stored_files(stack: RegistryStack) -> set[Path]:
    return {p for p in (stack.data_dir / "registry" / "artifacts").rglob("*") if p.is_file()}


async def _raw_upload(
    address: str, header: registry_pb2.UploadVersionRequest.Header, chunks: list[bytes]
) -> tuple[grpc.aio.AioRpcError, bool]:
    async with grpc.aio.insecure_channel(address) as channel:
        return await refused_upload(registry_pb2_grpc.ModelRegistryStub(channel), header, chunks)


async def test_upload_download_round_trip(registry_stack: RegistryStack, tmp_path: Path) -> None:
    async with AsyncRegistryClient(registry_stack.gateway.address) as registry:
        version = await registry.upload("digits", _digits_copy(tmp_path, os.urandom(8)))
        assert version.config.backend == "python" and version.config.max_batch_size == 64
        assert version.facts["artifact_bytes"] == version.artifact.size_bytes
        dest = tmp_path / "out.tar"
        got = await registry.download("digits", version.version, dest)
        assert got.artifact.sha256 == hashlib.sha256(dest.read_bytes()).hexdigest()


async def test_corrupt_or_truncated_uploads_leave_nothing_behind(
    registry_stack: RegistryStack,
) -> None:
    address = registry_stack.gateway.address
    async with AsyncRegistryClient(address) as registry:
        versions_before = [v.version for v in await registry.list_versions("digits")]
    files_before = _stored_files(registry_stack)
    payload = os.urandom(300_000)
    good = hashlib.sha256(payload).hexdigest()
    config = DIGITS.joinpath("config.pbtxt").read_text()

    def header(sha256: str, size: int) -> registry_pb2.UploadVersionRequest.Header:
        return registry_pb2.UploadVersionRequest.Header(
            model="digits",
            sha256=sha256,
            size_bytes=size,
            format="triton-python",
            config_pbtxt=config,
        )

    # Only what the bytes alone can show is refused after they streamed.
    wrong_hash, accepted = await _raw_upload(address, header("0" * 64, len(payload)), [payload])
    assert wrong_hash.code() == grpc.StatusCode.INVALID_ARGUMENT and accepted
    assert "sha256" in (wrong_hash.details() or "")
    truncated, accepted = await _raw_upload(
        address, header(good, len(payload)), [payload[:100_000]]
    )
    assert truncated.code() == grpc.StatusCode.INVALID_ARGUMENT and accepted
    too_big, accepted = await _raw_upload(address, header(good, 1 << 40), [payload])
    assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT and not accepted
    assert "size_bytes" in (too_big.details() or "")
    bad_config = header(good, len(payload))
    bad_config.config_pbtxt = "name: {"
    refused, accepted = await _raw_upload(address, bad_config, [payload])
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and not accepted
    assert "config_pbtxt" in (refused.details() or "")

    async with AsyncRegistryClient(address) as registry:
        assert [v.version for v in await registry.list_versions("digits")] == versions_before
    assert _stored_files(registry_stack) == files_before


async def test_a_flipped_byte_in_the_store_is_detected_and_never_loaded(
    registry_stack: RegistryStack, tmp_path: Path
) -> None:
    address = registry_stack.gateway.address
    async with AsyncRegistryClient(address) as registry:
        bad = await registry.upload("digits", _digits_copy(tmp_path, os.urandom(8)))
        good = await registry.upload("digits", _digits_copy(tmp_path, os.urandom(8)))
        # Before the bytes go bad: an alias whose rollback would lead to them.
        await registry.set_alias("digits", "rolled", bad.version)
        await registry.set_alias("digits", "rolled", good.version)
        sha = bad.artifact.sha256
        blob = next(p for p in _stored_files(registry_stack) if p.name == sha)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))

        with pytest.raises(DataLossError, match=f"digits:{bad.version}"):
            await registry.download("digits", bad.version, tmp_path / "bad.tar")

        # Nothing is sent to workers to load what none could: an alias move or a
        # deployment to the tampered version is refused, naming it.
        with pytest.raises(DataLossError, match=f"digits:{bad.version}"):
            await registry.set_deployment("digits", version=bad.version)
        with pytest.raises(DataLossError, match=f"digits:{bad.version}"):
            await registry.set_alias("digits", "tampered", bad.version)
        await registry.set_alias("digits", "tampered", good.version)
        with pytest.raises(DataLossError, match=f"digits:{bad.version}"):
            await registry.set_alias("digits", "tampered", bad.version)
        await registry.set_deployment("digits", version=good.version)
        async with AsyncGatewayClient(address) as client:
            for _ in range(600):
                loaded = {(m.name, m.version) for m in await client.list_models()}
                if ("digits", good.version) in loaded:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"digits:{good.version} was never loaded")
            assert ("digits", bad.version) not in loaded
        listed = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("tensorgate")),
            "models",
            "deployments",
            "--address",
            address,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await listed.communicate()
        served = {row.split("\t")[0]: row.split("\t")[3] for row in out.decode().splitlines()}
        assert f"digits:{bad.version}" not in served, served
        assert served[f"digits:{good.version}"] == "yes", served
        await registry.delete_deployment("digits", version=good.version)
        await registry.delete_alias("digits", "tampered")
        with pytest.raises(DataLossError, match=f"digits:{bad.version}"):
            await registry.rollback_alias("digits", "rolled")
        assert next(
            a for a in await registry.list_aliases("digits") if a.name == "rolled"
        ).version == (good.version)
        await registry.delete_alias("digits", "rolled")


async def test_concurrent_alias_moves_with_compare_and_set(
    registry_stack: RegistryStack, tmp_path: Path
) -> None:
    async with AsyncRegistryClient(registry_stack.gateway.address) as registry:
        one = await registry.upload("digits", _digits_copy(tmp_path, b"cas-1"))
        two = await registry.upload("digits", _digits_copy(tmp_path, b"cas-2"))
        three = await registry.upload("digits", _digits_copy(tmp_path, b"cas-3"))
        await registry.set_alias("digits", "canary", one.version)
        results = await asyncio.gather(
            registry.set_alias("digits", "canary", two.version, expected_version=one.version),
            registry.set_alias("digits", "canary", three.version, expected_version=one.version),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, registry_pb2.Alias)]
        lost = [r for r in results if isinstance(r, FailedPreconditionError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert f"points at version {won[0].version}" in str(lost[0])
        history = await registry.get_alias_history("digits", "canary")
        assert [m.to_version for m in history] == [one.version, won[0].version]


async def test_watch_resumes_without_missing_or_repeating(
    registry_stack: RegistryStack, tmp_path: Path
) -> None:
    address = registry_stack.gateway.address
    async with AsyncRegistryClient(address) as registry:
        seen: list[registry_pb2.RegistryEvent] = []
        async for event in registry.watch(0):
            seen.append(event)
            if event.revision >= 3:
                break  # the client goes away mid-feed
        version = await registry.upload("digits", _digits_copy(tmp_path, b"watch"))
        await registry.set_alias("digits", "watched", version.version, reason="watch test")
        await registry.delete_alias("digits", "watched")
        async for event in registry.watch(seen[-1].revision):
            seen.append(event)
            if event.WhichOneof("change") == "alias_deleted" and event.alias_deleted.alias == (
                "watched"
            ):
                break
        revisions = [e.revision for e in seen]
        assert revisions == list(range(1, len(revisions) + 1)), revisions
        kinds = [e.WhichOneof("change") for e in seen[-3:]]
        assert kinds == ["version_created", "alias_moved", "alias_deleted"]
