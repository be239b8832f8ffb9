"""kill -9 of the registry during uploads and alias moves: after a restart, everything it
acknowledged is there and consistent, and nothing half-written is visible. On SQLite (the
embedded default) and on PostgreSQL (tests/databases.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import sys
from pathlib import Path

import pytest
from tensorgate.errors import TensorgateClientError
from tensorgate.registry_client import AsyncRegistryClient

from services.runtime.process import free_port

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "repository" / "digits"

pytest_plugins = ("tests.databases",)


async def _start(
    data_dir: Path, database_url: str, port: int, log: Path
) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.registry",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
            "--log-format",
            "json",
            stdout=out,
            stderr=out,
        )
    async with AsyncRegistryClient(f"127.0.0.1:{port}", timeout=1.0) as client:
        for _ in range(300):
            with contextlib.suppress(TensorgateClientError):
                await client.list_deployments()
                return process
            await asyncio.sleep(0.1)
    process.kill()
    tail = log.read_bytes()[-2000:].decode(errors="replace")  # noqa: ASYNC240 (a test failing)
    raise AssertionError(f"the registry did not start: {tail}")


def _tar_of(payload: bytes, tmp: Path, index: int) -> Path:
    """A distinct artifact per upload: the digits model folder plus a file of its own."""
    folder = tmp / f"model-{index}"
    (folder / "1").mkdir(parents=True)
    for item in (DIGITS / "1").iterdir():
        if item.is_file():
            (folder / "1" / item.name).write_bytes(item.read_bytes())
    (folder / "1" / "extra.bin").write_bytes(payload)
    (folder / "config.pbtxt").write_text((DIGITS / "config.pbtxt").read_text())
    return folder


async def test_acknowledged_writes_survive_kill_9(tmp_path: Path, database_url: str) -> None:
    data_dir, log = tmp_path / "registry", tmp_path / "registry.log"
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = await _start(data_dir, database_url, port, log)
    folders = [_tar_of(os.urandom(200_000 + i), tmp_path, i) for i in range(12)]
    acknowledged_versions: dict[int, str] = {}  # version -> sha256 the registry confirmed
    acknowledged_moves: list[int] = []  # versions `production` was confirmed to point at
    try:
        async with AsyncRegistryClient(address, timeout=10.0) as client:
            await client.create_model("digits", task="infer")
            first = await client.upload("digits", folders[0])
            acknowledged_versions[first.version] = first.artifact.sha256
            await client.set_alias("digits", "production", first.version)
            acknowledged_moves.append(first.version)

            async def uploads() -> None:
                for folder in folders[1:]:
                    version = await client.upload("digits", folder)
                    acknowledged_versions[version.version] = version.artifact.sha256

            async def moves() -> None:
                current = first.version
                while True:
                    for version in list(acknowledged_versions):
                        if version != current:  # a move to where it points is no move
                            await client.set_alias("digits", "production", version)
                            acknowledged_moves.append(version)
                            current = version
                    await asyncio.sleep(0.005)

            async def killer() -> None:
                # Mid-stream: once a few uploads landed, with more and moves in flight.
                while len(acknowledged_versions) < 5:  # noqa: ASYNC110 (polls another task's progress)
                    await asyncio.sleep(0.01)
                process.send_signal(signal.SIGKILL)

            results = await asyncio.gather(uploads(), moves(), killer(), return_exceptions=True)
            # The uploads and moves in flight when it died fail; nothing else may.
            for result in results[:2]:
                assert isinstance(result, TensorgateClientError), result
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    process = await _start(data_dir, database_url, port, log)
    try:
        async with AsyncRegistryClient(address, timeout=10.0) as client:
            versions = {v.version: v for v in await client.list_versions("digits")}
            # Every acknowledged version is there with the artifact it was acknowledged with.
            for number, sha256 in acknowledged_versions.items():
                assert versions[number].artifact.sha256 == sha256
            # Versions are numbered 1..n without gaps (nothing half-created).
            assert sorted(versions) == list(range(1, len(versions) + 1))
            # Every version that is visible can be downloaded whole and matches its hash.
            for number, version in versions.items():
                dest = tmp_path / f"download-{number}.tar"
                await client.download("digits", number, dest)
                assert hashlib.sha256(dest.read_bytes()).hexdigest() == version.artifact.sha256
            # The alias points at a version that exists, and its history holds every
            # acknowledged move, in order, each from where the previous one left it.
            history = await client.get_alias_history("digits", "production")
            targets = [move.to_version for move in history]
            assert targets[: len(acknowledged_moves)] == acknowledged_moves
            assert len(targets) <= len(acknowledged_moves) + 1  # at most the one in flight
            for before, after in itertools.pairwise(history):
                assert after.from_version == before.to_version
            alias = (await client.list_aliases("digits"))[0]
            assert alias.version == targets[-1] and alias.version in versions
        # No upload left a temporary file or an unreferenced blob behind.
        stored = {p.name for p in (data_dir / "artifacts").rglob("*") if p.is_file()}
        assert stored == {v.artifact.sha256 for v in versions.values()} | {
            "registry.lock",
            "sweep.lock",
        }
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # grpc would send 127.0.0.1 calls through a configured proxy.
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
