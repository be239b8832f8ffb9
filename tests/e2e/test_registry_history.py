"""A watcher that resumes checks it is still following the same history: a registry
restored from a backup that moved past the watcher's revision with other changes is
refused with FAILED_PRECONDITION, never resumed into silently (real registries on
port 0, one SQLite database copied as a backup would be)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc
from tensorgate.registry_client import AsyncRegistryClient

from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings


async def _start(data_dir: Path) -> Registry:
    return await start_registry(
        RegistrySettings(data_dir=data_dir, metrics_port=0, drain_seconds=0.0)
    )


async def _models(registry: Registry, *names: str) -> None:
    async with AsyncRegistryClient(registry.address) as client:
        for name in names:
            await client.create_model(name, task="infer")


async def _watch(
    registry: Registry, request: registry_pb2.WatchRequest, count: int
) -> list[registry_pb2.RegistryEvent]:
    """The first `count` events the registry sends for `request`."""
    async with grpc.aio.insecure_channel(registry.address) as channel:
        call = registry_pb2_grpc.ModelRegistryStub(channel).Watch(request, timeout=10)
        seen: list[registry_pb2.RegistryEvent] = []
        try:
            async for event in call:
                seen.append(event)
                if len(seen) == count:
                    break
        finally:
            call.cancel()
        return seen


async def test_a_restored_registry_that_moved_past_a_watcher_is_refused(
    tmp_path: Path,
) -> None:
    live, backup = tmp_path / "live", tmp_path / "backup"
    registry = await _start(live)
    await _models(registry, "a", "b", "c")
    await registry.stop()
    shutil.copytree(live, backup)  # the backup, taken at revision 3

    registry = await _start(live)
    try:
        await _models(registry, "d", "e")
        followed = await _watch(registry, registry_pb2.WatchRequest(since_revision=0), 5)
        last = followed[-1]
        assert last.revision == 5 and last.model_changed.name == "e"
        resume = registry_pb2.WatchRequest(since_revision=5, since_time=last.time)
        await _models(registry, "f")
        # The same history: resumed after revision 5, exactly.
        (after,) = await _watch(registry, resume, 1)
        assert (after.revision, after.model_changed.name) == (6, "f")
    finally:
        await registry.stop()

    restored = await _start(backup)
    try:
        await _models(restored, "x", "y", "z")  # revisions 4..6 again, other changes
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _watch(restored, resume, 1)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not the one you saw" in (refused.value.details() or "")
        # Without the time, a revision alone would have resumed into the other history.
        (mixed,) = await _watch(restored, registry_pb2.WatchRequest(since_revision=5), 1)
        assert (mixed.revision, mixed.model_changed.name) == (6, "z")
        # ListAliases says where to start following, and when that change was made.
        async with grpc.aio.insecure_channel(restored.address) as channel:
            listing = await registry_pb2_grpc.ModelRegistryStub(channel).ListAliases(
                registry_pb2.ListAliasesRequest()
            )
        (z,) = await _watch(restored, registry_pb2.WatchRequest(since_revision=5), 1)
        assert listing.revision == 6 and listing.revision_time == z.time
        assert listing.revision_time != Timestamp()
    finally:
        await restored.stop()
