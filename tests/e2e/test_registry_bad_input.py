"""Bad input to the registry gets INVALID_ARGUMENT (or the status the contract names) with
a message that says what to fix, and leaves nothing behind; found by attacking it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate.errors import FailedPreconditionError
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc
from tensorgate.registry_client import AsyncRegistryClient

from gateway.server import start_gateway
from gateway.settings import GatewaySettings
from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from tests.conftest import RegistryStack
from tests.helpers import refused_upload

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "models" / "repository" / "digits" / "config.pbtxt").read_text()
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def stub(
    registry_stack: RegistryStack,
) -> AsyncIterator[registry_pb2_grpc.ModelRegistryAsyncStub]:
    async with grpc.aio.insecure_channel(registry_stack.gateway.address) as channel:
        yield registry_pb2_grpc.ModelRegistryStub(channel)


async def _status(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), caught.value.details() or ""


def _stored(stack: RegistryStack) -> set[Path]:
    return {p for p in (stack.data_dir / "registry" / "artifacts").rglob("*") if p.is_file()}


async def _upload(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub,
    payload: bytes,
    **header: object,
) -> tuple[grpc.StatusCode, str]:
    fields: dict[str, object] = {
        "model": "digits",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size_bytes": len(payload),
        "format": "triton-python",
        "config_pbtxt": CONFIG,
    }
    fields.update(header)

    header_message = registry_pb2.UploadVersionRequest.Header(**fields)  # type: ignore[arg-type]
    error, _ = await refused_upload(stub, header_message, [payload])
    return error.code(), error.details() or ""


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_oversized_fields_are_refused_and_the_feed_keeps_flowing(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub, registry_stack: RegistryStack
) -> None:
    huge = registry_pb2.Model(name="poison", task="infer", description="x" * (8 << 20))
    code, details = await _status(
        stub.CreateModel(registry_pb2.CreateModelRequest(model=huge), timeout=30)
    )
    assert code == INVALID and "model.description" in details
    many = registry_pb2.Model(
        name="poison", task="infer", labels={f"k{i}": "v" for i in range(1000)}
    )
    code, details = await _status(
        stub.CreateModel(registry_pb2.CreateModelRequest(model=many), timeout=30)
    )
    assert code == INVALID and "labels" in details
    reason = registry_pb2.SetAliasRequest(model="digits", alias="x", version=1, reason="r" * 5000)
    code, details = await _status(stub.SetAlias(reason, timeout=30))
    assert code == INVALID and "reason" in details
    # The feed from the start still arrives whole, within a default 4 MiB client limit.
    async with grpc.aio.insecure_channel(registry_stack.gateway.address) as small:
        plain = registry_pb2_grpc.ModelRegistryStub(small)
        reached = 0
        async for event in plain.Watch(registry_pb2.WatchRequest(since_revision=0), timeout=30):
            reached = event.revision
            if reached >= 5:
                break
        assert reached >= 5, f"the feed stopped at revision {reached}"


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-62135596801, 0), (253402300800, 0), (2**62, 0), (0, -1), (0, 2_000_000_000)],
)
async def test_times_out_of_range_are_invalid(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub, seconds: int, nanos: int
) -> None:
    request = registry_pb2.GetAliasAtRequest(
        model="digits", alias="production", time=Timestamp(seconds=seconds, nanos=nanos)
    )
    code, details = await _status(stub.GetAliasAt(request, timeout=30))
    assert code == INVALID and "time" in details


async def test_control_characters_names_and_unbounded_filters_are_invalid(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub,
) -> None:
    # NUL cannot be stored by PostgreSQL (it was INTERNAL there), an escape sequence
    # would reach an operator's terminal, and a filter of 1,000 labels is 1,000 joins.
    model = registry_pb2.Model
    calls = {
        "name": stub.GetModel(registry_pb2.GetModelRequest(name="digits\x00")),
        "model": stub.ListVersions(registry_pb2.ListVersionsRequest(model="di\x00gits")),
        "model.description": stub.CreateModel(
            registry_pb2.CreateModelRequest(
                model=model(name="ctl", task="infer", description="\x1b]0;pwned\x07")
            )
        ),
        "model.labels": stub.CreateModel(
            registry_pb2.CreateModelRequest(
                model=model(name="ctl", task="infer", labels={"team": "a\x00b"})
            )
        ),
        "reason": stub.SetAlias(
            registry_pb2.SetAliasRequest(
                model="digits", alias="p", version=1, reason="\u202egnp.exe"
            )
        ),
        "alias": stub.GetAliasHistory(
            registry_pb2.GetAliasHistoryRequest(model="digits", alias="p\x00")
        ),
        "labels": stub.ListModels(
            registry_pb2.ListModelsRequest(labels={f"k{i}": "v" for i in range(1000)})
        ),
        "task": stub.ListModels(registry_pb2.ListModelsRequest(task="in\x00fer")),
        "page_token": stub.ListModels(registry_pb2.ListModelsRequest(page_token="W" * 200_000)),
    }
    for field, call in calls.items():
        code, details = await _status(call)
        assert code == INVALID and details.startswith(field), (field, details)


async def test_versions_and_names_that_cannot_exist_are_invalid_not_missing(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub,
) -> None:
    calls = [
        stub.GetVersion(registry_pb2.GetVersionRequest(model="digits", version=-1)),
        stub.DeleteVersion(registry_pb2.DeleteVersionRequest(model="digits", version=0)),
        stub.SetDeployment(
            registry_pb2.SetDeploymentRequest(
                deployment=registry_pb2.Deployment(model="digits", version=-1)
            )
        ),
        stub.SetAlias(registry_pb2.SetAliasRequest(model="digits", alias="", version=1)),
        stub.SetAlias(registry_pb2.SetAliasRequest(model="digits", alias="../x", version=1)),
    ]
    for call in calls:
        code, _ = await _status(call)
        assert code == INVALID


async def test_refused_uploads_leave_no_bytes_behind(
    stub: registry_pb2_grpc.ModelRegistryAsyncStub, registry_stack: RegistryStack
) -> None:
    before = _stored(registry_stack)
    archive = _tar({"model.py": os.urandom(64)})
    code, details = await _upload(stub, archive, lineage=registry_pb2.Lineage(parent_version=999))
    assert code == grpc.StatusCode.NOT_FOUND and "999" in details
    code, details = await _upload(stub, b"not a tar at all " + os.urandom(600))
    assert code == INVALID and "tar" in details
    code, details = await _upload(stub, _tar({"../escape.py": b"x"}))
    assert code == INVALID and "tar" in details
    # Every format is a tar of the version folder: a worker unpacks each the same way.
    code, details = await _upload(stub, b"onnx bytes, no tar " + os.urandom(600), format="onnx")
    assert code == INVALID and "tar" in details
    code, details = await _upload(stub, _tar({"m.onnx": b"x", "m.onnx/x": b"y"}), format="onnx")
    assert code == INVALID and "both a file and a folder" in details
    code, details = await _upload(stub, archive, config_pbtxt='backend: "../x"')
    assert code == INVALID
    assert _stored(registry_stack) == before


async def test_two_rollbacks_at_once_cannot_undo_each_other(
    registry_stack: RegistryStack, tmp_path: Path
) -> None:
    async with AsyncRegistryClient(registry_stack.gateway.address) as registry:
        folder = REPO / "models" / "repository" / "digits"
        first = (await registry.upload("digits", folder)).version
        second = (await registry.upload("digits", folder)).version
        await registry.set_alias("digits", "rb", first)
        await registry.set_alias("digits", "rb", second, reason="a bad release")
        results = await asyncio.gather(
            registry.rollback_alias("digits", "rb", expected_version=second),
            registry.rollback_alias("digits", "rb", expected_version=second),
            return_exceptions=True,
        )
        assert sum(isinstance(r, FailedPreconditionError) for r in results) == 1, results
        alias = next(a for a in await registry.list_aliases("digits") if a.name == "rb")
        assert alias.version == first and alias.previous_version == second


async def test_a_stalled_upload_is_abandoned_and_frees_its_slot(tmp_path: Path) -> None:
    # One upload slot: a client that sends its header and then nothing must not hold it.
    registry = await start_registry(
        RegistrySettings(
            data_dir=tmp_path,
            metrics_port=0,
            drain_seconds=0.0,
            max_uploads=1,
            upload_idle_seconds=0.5,
        )
    )
    payload = _tar({"model.py": b"# a model\n"})
    header = registry_pb2.UploadVersionRequest.Header(
        model="digits",
        sha256=hashlib.sha256(payload).hexdigest(),
        size_bytes=len(payload),
        format="triton-python",
        config_pbtxt=CONFIG,
    )
    gateway = await start_gateway(
        GatewaySettings(
            allow_anonymous=True,
            workers=("127.0.0.1:1",),
            registry=registry.address,
            metrics_port=0,
            drain_seconds=0.0,
        )
    )
    try:
        async with AsyncRegistryClient(registry.address) as client:
            await client.create_model("digits", task="infer")
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)

            async def stalled() -> AsyncIterator[registry_pb2.UploadVersionRequest]:
                yield registry_pb2.UploadVersionRequest(header=header)
                await asyncio.Event().wait()
                yield registry_pb2.UploadVersionRequest()

            held = stub.UploadVersion(stalled(), timeout=30)
            await held.initial_metadata()  # accepted: it has the slot
            second = iter([registry_pb2.UploadVersionRequest(header=header)])
            code, details = await _status(stub.UploadVersion(second, timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            code, details = await _status(held)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "sent nothing" in details
        # Through the gateway, the stalled caller hears the registry's status when the
        # registry gives up, not at its own deadline (which says "Deadline Exceeded").
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            held = stub.UploadVersion(stalled(), timeout=20)
            await held.initial_metadata()
            code, details = await _status(held)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "sent nothing" in details
        async with AsyncRegistryClient(registry.address) as client:
            folder = REPO / "models" / "repository" / "digits"
            assert (await client.upload("digits", folder)).version == 1
        assert [p for p in (tmp_path / "artifacts" / "tmp").rglob("*") if p.is_file()] == []
    finally:
        await gateway.stop()
        await registry.stop()


async def _same_bytes_twice(tmp_path: Path) -> tuple[Registry, bytes, Any]:
    """A registry with model "same" at versions 1 and 2, the bytes two uploads will
    share, and their header."""
    registry = await start_registry(
        RegistrySettings(data_dir=tmp_path, metrics_port=0, drain_seconds=0.0)
    )
    async with AsyncRegistryClient(registry.address) as client:
        folder = REPO / "models" / "repository" / "digits"
        await client.create_model("same", task="infer")
        await client.upload("same", folder)
        await client.upload("same", folder, description="the parent, deleted below")
    payload = _tar({"model.py": os.urandom(2048)})
    header = registry_pb2.UploadVersionRequest.Header(
        model="same",
        sha256=hashlib.sha256(payload).hexdigest(),
        size_bytes=len(payload),
        format="triton-python",
        config_pbtxt=CONFIG,
    )
    return registry, payload, header


async def _doomed_upload(stub: Any, header: Any) -> Any:
    """Upload A, accepted, whose lineage parent (version 2) is deleted before its bytes
    come: it lands them, then fails (NOT_FOUND) and cleans up."""
    a = stub.UploadVersion(timeout=30)
    doomed = registry_pb2.UploadVersionRequest.Header()
    doomed.CopyFrom(header)
    doomed.lineage.parent_version = 2
    await a.write(registry_pb2.UploadVersionRequest(header=doomed))
    await a.initial_metadata()
    await stub.DeleteVersion(registry_pb2.DeleteVersionRequest(model="same", version=2))
    return a


async def _send(call: Any, *parts: registry_pb2.UploadVersionRequest) -> None:
    for part in parts:
        await call.write(part)
    await call.done_writing()


async def _c_is_whole(
    registry: Registry, version: registry_pb2.ModelVersion, payload: bytes, tmp_path: Path
) -> None:
    async with AsyncRegistryClient(registry.address) as client:
        await client.download("same", version.version, tmp_path / "c.tar")
    assert (tmp_path / "c.tar").read_bytes() == payload


async def test_an_upload_that_fails_after_its_bytes_landed_spares_one_begun_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upload C of the same bytes begins while A's clean-up reads the database, and
    # installs the blob before A decides: A must leave it to C.
    registry, payload, header = await _same_bytes_twice(tmp_path)
    a_checking, c_installed, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    in_use, create = RegistryStore.artifact_in_use, RegistryStore.create_version

    async def in_use_while_c_lands(self: RegistryStore, sha256: str) -> bool:
        answer = await in_use(self, sha256)
        a_checking.set()
        await c_installed.wait()
        return answer

    async def create_after_a(self: RegistryStore, model: str, **fields: Any) -> Any:
        if not fields["lineage"].parent_version:  # upload C
            c_installed.set()
            await a_done.wait()
        return await create(self, model, **fields)

    monkeypatch.setattr(RegistryStore, "artifact_in_use", in_use_while_c_lands)
    monkeypatch.setattr(RegistryStore, "create_version", create_after_a)
    try:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            a = await _doomed_upload(stub, header)
            await _send(a, registry_pb2.UploadVersionRequest(chunk=payload))
            await a_checking.wait()
            c = stub.UploadVersion(timeout=30)  # type: ignore[call-arg]
            await c.write(registry_pb2.UploadVersionRequest(header=header))
            await c.initial_metadata()
            await _send(c, registry_pb2.UploadVersionRequest(chunk=payload))
            code, _ = await _status(a)
            assert code == grpc.StatusCode.NOT_FOUND
            a_done.set()
            c_version = await c
        monkeypatch.undo()
        await _c_is_whole(registry, c_version, payload, tmp_path)
    finally:
        await registry.stop()


async def test_an_upload_that_fails_after_its_bytes_landed_spares_one_that_ended_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Upload C of the same bytes is under way when A fails, and commits and ends while
    # A's clean-up reads the database (which cannot see C's version yet).
    registry, payload, header = await _same_bytes_twice(tmp_path)
    a_failed, c_ended = asyncio.Event(), asyncio.Event()
    in_use, create = RegistryStore.artifact_in_use, RegistryStore.create_version

    async def in_use_until_c_ended(self: RegistryStore, sha256: str) -> bool:
        answer = await in_use(self, sha256)  # a read that cannot see C's version
        await c_ended.wait()
        return answer

    async def create_in_turn(self: RegistryStore, model: str, **fields: Any) -> Any:
        if fields["lineage"].parent_version:  # upload A: fails, then cleans up
            try:
                return await create(self, model, **fields)
            finally:
                a_failed.set()
        await a_failed.wait()  # upload C commits once A is cleaning up
        return await create(self, model, **fields)

    monkeypatch.setattr(RegistryStore, "artifact_in_use", in_use_until_c_ended)
    monkeypatch.setattr(RegistryStore, "create_version", create_in_turn)
    try:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            a = await _doomed_upload(stub, header)
            c = stub.UploadVersion(timeout=30)  # type: ignore[call-arg]
            await c.write(registry_pb2.UploadVersionRequest(header=header))
            await c.initial_metadata()
            await _send(c, registry_pb2.UploadVersionRequest(chunk=payload))
            c_version = asyncio.ensure_future(c)
            await _send(a, registry_pb2.UploadVersionRequest(chunk=payload))
            await c_version
            c_ended.set()
            code, _ = await _status(a)
            assert code == grpc.StatusCode.NOT_FOUND
        monkeypatch.undo()
        await _c_is_whole(registry, c_version.result(), payload, tmp_path)
    finally:
        await registry.stop()
