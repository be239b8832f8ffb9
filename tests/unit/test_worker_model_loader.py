"""The loader against a stand-in Triton that reads the folders the loader writes: loads,
retirement only after the replacement is ready and `retire_seconds` passed, a tampered
artifact never loaded nor retried, failed loads retried with backoff, adoption at start,
and the catalog's watchers seeing only the latest list."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from google.protobuf import text_format
from tensorgate.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.runtime.errors import NotFound
from services.worker import model_loader
from services.worker.artifact_cache import ArtifactCache
from services.worker.catalog import ModelCatalog
from services.worker.desired_state import VersionKey, WantedVersion
from services.worker.model_loader import ModelLoader
from services.worker.model_repository import ModelRepository
from tests.unit.test_worker_artifacts import CONFIG, good_tar


class FakeTriton:
    """Loads what the repository holds, as Triton's explicit model control does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ready: dict[str, model_config_pb2.ModelConfig] = {}
        self.calls: list[str] = []
        self.failing: set[str] = set()
        self.hanging: dict[str, asyncio.Event] = {}  # loads that wait for their event

    async def load_model(self, name: str) -> None:
        self.calls.append(f"load {name}")
        if name in self.hanging:
            await self.hanging[name].wait()
        if name in self.failing:
            raise RuntimeError(f"Triton could not load {name}: boom")
        text = (self.root / name / "config.pbtxt").read_text()
        assert (self.root / name / "1" / "model.py").is_file()
        self.ready[name] = text_format.Parse(text, model_config_pb2.ModelConfig())

    async def unload_model(self, name: str) -> None:
        self.calls.append(f"unload {name}")
        self.ready.pop(name, None)

    async def ready_versions(self) -> dict[str, list[int]]:
        return {name: [1] for name in self.ready}

    async def model_config(self, name: str, version: int) -> model_config_pb2.ModelConfig:
        return self.ready[name]


class Registry:
    """Artifacts by version; `tampered` ones are served with a byte flipped."""

    def __init__(self) -> None:
        self.blobs: dict[VersionKey, bytes] = {}
        self.tampered: set[VersionKey] = set()
        self.downloads: list[VersionKey] = []

    def version(self, model: str, version: int) -> registry_pb2.ModelVersion:
        data = good_tar() + bytes(version)  # tar readers ignore trailing zero blocks
        self.blobs[(model, version)] = data
        return registry_pb2.ModelVersion(
            model=model,
            version=version,
            artifact=registry_pb2.Artifact(
                sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
            ),
            config=registry_pb2.TritonConfig(backend="python", pbtxt=CONFIG),
        )

    async def download(
        self, model: str, version: int
    ) -> AsyncIterator[registry_pb2.DownloadVersionResponse]:
        self.downloads.append((model, version))
        data = bytearray(self.blobs[(model, version)])
        if (model, version) in self.tampered:
            data[100] ^= 0xFF
        yield registry_pb2.DownloadVersionResponse(version=registry_pb2.ModelVersion())
        yield registry_pb2.DownloadVersionResponse(chunk=bytes(data))


class World:
    def __init__(
        self,
        tmp_path: Path,
        retire_seconds: float = 0.2,
        retire_max_seconds: float = 300.0,
        rejected_retry_seconds: float = 300.0,
    ) -> None:
        self.repository = ModelRepository(tmp_path / "repo")
        self.triton = FakeTriton(tmp_path / "repo")
        self.registry = Registry()
        self.catalog = ModelCatalog()
        self.wanted: dict[VersionKey, WantedVersion] = {}
        self.loader = ModelLoader(
            triton=self.triton,
            catalog=self.catalog,
            repository=self.repository,
            cache=ArtifactCache(tmp_path / "cache"),
            download=self.registry.download,
            retire_seconds=retire_seconds,
            retire_max_seconds=retire_max_seconds,
            rejected_retry_seconds=rejected_retry_seconds,
        )

    def want(self, *versions: tuple[str, int], instances: int = 1) -> None:
        self.wanted = {}
        for model, number in versions:
            version = self.registry.version(model, number)
            self.wanted[(model, number)] = WantedVersion(version, instances)

    async def reconcile(self) -> float | None:
        return await self.loader.reconcile(lambda: self.wanted, wait=60)

    def served(self) -> list[str]:
        return [model.label for model in self.catalog.models()]


@pytest.fixture(autouse=True)
def _no_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in Triton has no calls in flight to wait for.
    monkeypatch.setattr(model_loader, "_SWITCH_DRAIN_S", 0.0)


@pytest.fixture(autouse=True)
def _registry_header_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in registry sends an empty header; the header check has its own tests.
    monkeypatch.setattr("services.worker.artifact_cache._check_header", lambda *_: None)


async def test_an_alias_move_loads_the_new_version_then_retires_the_old(tmp_path: Path) -> None:
    world = World(tmp_path, retire_seconds=0.3)
    world.want(("m", 1))
    assert await world.reconcile() is None
    assert world.served() == ["m:1"]
    model = world.catalog.resolve("m:1")
    assert (model.triton_name, model.triton_version) == ("m__v1", "1")

    world.want(("m", 2))
    await world.reconcile()
    assert world.served() == ["m:1", "m:2"]  # both routable while gateways switch
    assert world.catalog.resolve("m").info.version == 2
    await asyncio.sleep(0.15)
    assert world.served() == ["m:1", "m:2"]
    await asyncio.sleep(0.3)
    assert world.served() == ["m:2"]
    assert world.triton.calls == ["load m__v1", "load m__v2", "unload m__v1"]
    assert world.repository.names() == ["m__v2"]


async def test_a_replaced_version_still_called_stays_until_idle(tmp_path: Path) -> None:
    # A gateway waiting for a slower worker keeps the alias's traffic on the old version:
    # this worker must not let go of it while those calls keep coming.
    world = World(tmp_path, retire_seconds=0.3)
    world.want(("m", 1))
    await world.reconcile()
    world.want(("m", 2))
    await world.reconcile()
    for _ in range(8):  # 0.8 s of calls, well past retire_seconds
        world.catalog.resolve("m:1")
        await asyncio.sleep(0.1)
    assert world.served() == ["m:1", "m:2"]
    await asyncio.sleep(0.45)  # then quiet for longer than retire_seconds
    assert world.served() == ["m:2"]


async def test_a_replaced_version_called_forever_goes_at_retire_max(tmp_path: Path) -> None:
    world = World(tmp_path, retire_seconds=0.2, retire_max_seconds=0.5)
    world.want(("m", 1))
    await world.reconcile()
    world.want(("m", 2))
    await world.reconcile()
    for _ in range(10):  # called every 0.1 s for 1 s: never idle
        with contextlib.suppress(NotFound):
            world.catalog.resolve("m:1")
        await asyncio.sleep(0.1)
    assert world.served() == ["m:2"]


async def test_a_tampered_artifact_is_not_loaded_and_is_fetched_again_only_later(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, retire_seconds=0.0, rejected_retry_seconds=0.5)
    world.want(("m", 1))
    await world.reconcile()
    world.want(("m", 2))
    world.registry.tampered.add(("m", 2))
    with structlog.testing.capture_logs() as logs:
        retry_in = await world.reconcile()
        assert retry_in is not None and 0.3 < retry_in <= 0.5
        await world.reconcile()  # not due yet
        await asyncio.sleep(0.05)
    assert world.served() == ["m:1"]  # still serving what it had
    assert world.repository.names() == ["m__v1"]  # nothing written for the bad one
    assert world.registry.downloads == [("m", 1), ("m", 2)]  # not fetched again yet
    (error,) = [line for line in logs if line["log_level"] == "error"]
    assert error["version"] == "m:2" and error["retry_in_s"] == 0.5
    sha = world.wanted[("m", 2)].version.artifact.sha256
    assert sha in error["reason"] and "received" in error["reason"]

    # Repaired in the registry meanwhile: the next try loads it.
    world.registry.tampered.clear()
    await asyncio.sleep(0.5)
    assert await world.reconcile() is None
    await asyncio.sleep(0.05)
    assert world.served() == ["m:2"]
    assert world.registry.downloads == [("m", 1), ("m", 2), ("m", 2)]


async def test_a_failed_load_is_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_loader, "_FIRST_RETRY_S", 0.1)
    world = World(tmp_path)
    world.want(("a", 1), ("b", 1))
    world.triton.failing.add("a__v1")
    first = await world.reconcile()
    assert world.served() == ["b:1"]  # one failure holds nothing else back
    assert first is not None and 0 < first <= 0.1
    assert await world.reconcile() == pytest.approx(first, abs=0.05)  # not due yet
    assert world.triton.calls.count("load a__v1") == 1
    await asyncio.sleep(first)
    second = await world.reconcile()
    assert second is not None and 0.1 < second <= 0.2  # backing off
    world.triton.failing.clear()
    await asyncio.sleep(second)
    assert await world.reconcile() is None
    assert world.served() == ["a:1", "b:1"]
    assert world.registry.downloads.count(("a", 1)) == 1  # the verified artifact was kept


async def test_a_version_that_failed_leaves_nothing_once_it_is_no_longer_wanted(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.want(("a", 1), ("b", 2))
    world.triton.failing.add("a__v1")
    await world.reconcile()
    assert world.repository.names() == ["a__v1", "b__v2"]  # written, then refused by Triton
    assert len(list((tmp_path / "cache").iterdir())) == 2
    world.want(("b", 2))
    assert await world.reconcile() is None  # nothing left to retry
    assert world.repository.names() == ["b__v2"]
    assert "unload a__v1" in world.triton.calls  # Triton may hold it after all
    cached = [p.stem for p in (tmp_path / "cache").iterdir()]
    assert cached == [world.wanted[("b", 2)].version.artifact.sha256]
    assert world.served() == ["b:2"]


async def test_a_hung_load_holds_no_other_model_back(tmp_path: Path) -> None:
    # Model a's initialize hangs; b is deployed, then rolled to v2 and back to v1 meanwhile.
    world = World(tmp_path, retire_seconds=0.0)
    released = asyncio.Event()
    world.triton.hanging["a__v1"] = released
    passes = asyncio.Event()
    world.loader.on_change(passes.set)

    async def settle(*labels: str) -> None:
        async with asyncio.timeout(10):
            while world.served() != list(labels):
                retry_in = await world.loader.reconcile(lambda: world.wanted)
                passes.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retry_in or 0.05):
                        await passes.wait()

    world.want(("a", 1), ("b", 1))
    # A first pass waits for the loads, but not for ever: b is served, a still loads.
    await world.loader.reconcile(lambda: world.wanted, wait=0.5)
    assert world.served() == ["b:1"] and world.loader.loading() == ["a"]
    world.want(("a", 1), ("b", 2))
    await settle("b:2")
    world.want(("a", 1), ("b", 1))
    await settle("b:1")
    assert world.triton.calls.count("load a__v1") == 1  # still the first, still hung
    released.set()
    await settle("a:1", "b:1")
    await world.loader.close()


async def test_a_version_wanted_again_while_retiring_stays(tmp_path: Path) -> None:
    world = World(tmp_path, retire_seconds=0.2)
    world.want(("m", 1))
    await world.reconcile()
    world.want(("m", 2))
    await world.reconcile()
    world.want(("m", 1), ("m", 2))
    await world.reconcile()
    await asyncio.sleep(0.3)
    assert world.served() == ["m:1", "m:2"]
    assert "unload m__v1" not in world.triton.calls


async def test_the_old_version_stays_until_every_replacement_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_loader, "_FIRST_RETRY_S", 0.05)
    world = World(tmp_path, retire_seconds=0.0)
    world.want(("m", 1))
    await world.reconcile()
    world.want(("m", 2), ("m", 3))
    world.triton.failing.add("m__v3")
    await world.reconcile()
    await asyncio.sleep(0.1)
    assert world.served() == ["m:1", "m:2"]
    world.triton.failing.clear()
    await world.reconcile()
    await asyncio.sleep(0.05)
    assert world.served() == ["m:2", "m:3"]


async def test_a_deleted_deployment_retires_its_version(tmp_path: Path) -> None:
    world = World(tmp_path, retire_seconds=0.0)
    world.want(("m", 1), ("n", 1))
    await world.reconcile()
    world.want(("n", 1))
    await world.reconcile()
    await asyncio.sleep(0.05)
    assert world.served() == ["n:1"]
    assert world.repository.names() == ["n__v1"]


async def test_changing_instances_loads_beside_the_running_model_then_lets_it_go(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.want(("m", 1))
    await world.reconcile()
    world.want(("m", 1), instances=3)
    await world.reconcile()
    # Never unloaded before its replacement serves: the version is never down.
    assert world.triton.calls == ["load m__v1", "load m__v1__x3", "unload m__v1"]
    assert [g.count for g in world.triton.ready["m__v1__x3"].instance_group] == [3]
    assert world.catalog.resolve("m:1").triton_name == "m__v1__x3"
    assert world.repository.names() == ["m__v1__x3"]
    world.want(("m", 1))
    await world.reconcile()
    assert world.triton.calls[3:] == ["load m__v1", "unload m__v1__x3"]
    assert world.served() == ["m:1"]


async def test_a_replacement_that_fails_to_load_leaves_the_running_model_serving(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.want(("m", 1))
    await world.reconcile()
    world.triton.failing.add("m__v1__x2")
    world.want(("m", 1), instances=2)
    await world.reconcile()
    assert world.triton.calls == ["load m__v1", "load m__v1__x2"]
    assert world.catalog.resolve("m:1").triton_name == "m__v1"
    assert "m__v1" in world.triton.ready


async def test_at_start_it_keeps_what_is_wanted_and_lets_go_of_the_rest(tmp_path: Path) -> None:
    before = World(tmp_path)
    before.want(("m", 1), ("old", 4))
    await before.reconcile()
    (tmp_path / "repo" / "gone__v9").mkdir()
    (tmp_path / "repo" / ".m__v7.abcd").mkdir()  # a folder half built when it died
    (tmp_path / "repo" / "not-ours").mkdir()

    # A worker restarts against the same (remote) Triton, which kept its models.
    world = World(tmp_path)
    world.triton.ready = before.triton.ready
    world.want(("m", 1))
    await world.loader.adopt(world.wanted)
    assert world.served() == ["m:1"]
    assert world.triton.calls == ["unload old__v4"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["m__v1", "not-ours"]
    assert await world.reconcile() is None
    assert world.triton.calls == ["unload old__v4"]  # nothing reloaded in place


async def test_watchers_get_the_list_at_once_then_only_the_latest(tmp_path: Path) -> None:
    world = World(tmp_path)
    watch = world.catalog.watch()
    assert await anext(watch) == []
    for number in (1, 2, 3):
        world.want(("m", number))
        await world.reconcile()  # loads one, changes the catalog each time
    # Three changes while the watcher was away: it gets one list, the current one.
    latest = await asyncio.wait_for(anext(watch), 1)
    assert [m.label for m in latest] == world.served()
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    assert not pending.done()
    world.catalog.close()
    assert [m.label for m in await asyncio.wait_for(pending, 1)] == world.served()
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
    await world.loader.close()
