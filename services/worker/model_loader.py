"""Makes what this worker's Triton serves match what the registry wants.

For each wanted version not loaded yet, one at a time per model: the artifact is
fetched into the cache and verified (sha256 and size) before anything is written
into the model repository, its folder is written (model_repository.py), Triton
loads it (explicit model control) and the catalog starts routing to it. Models
load side by side, so a model whose load takes minutes (or hangs in its
initialize) holds back no other model's rollout or rollback.

A version no longer wanted is let go only once every wanted version of its model
is loaded, and then only once no call has come for it for `retire_seconds`: a
gateway keeps an alias's traffic on the old version until the new one is loaded on
every worker, so a worker that was quick must keep the old one while a slower one
catches up (`retire_max_seconds` bounds that). Then it leaves the catalog (no new
calls), Triton unloads it (calls in flight finish) and its folder goes.

Failures never stop the worker. An artifact that is not what the registry
recorded is logged and fetched again only every `rejected_retry_seconds`; any
other failure (registry or Triton trouble) is retried with backoff. What a failed
version left behind goes once it is no longer wanted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog
from tensorgate.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.worker.artifact_cache import ArtifactCache, ArtifactRejected
from services.worker.catalog import ModelCatalog, loaded_model
from services.worker.desired_state import VersionKey, WantedVersion
from services.worker.model_repository import (
    TRITON_VERSION,
    ModelRepository,
    parse_triton_name,
    triton_name,
)

log = structlog.get_logger("tensorgate.worker.loader")

Wanted = Mapping[VersionKey, WantedVersion]
Download = Callable[[str, int], AsyncIterable[registry_pb2.DownloadVersionResponse]]

_FIRST_RETRY_S = 1.0
# Between taking a Triton model out of the catalog and unloading it.
_SWITCH_DRAIN_S = 1.0


class TritonControl(Protocol):
    """What the loader asks of Triton (TritonConnection, or a stand-in in tests)."""

    async def load_model(self, name: str) -> None: ...
    async def unload_model(self, name: str) -> None: ...
    async def ready_versions(self) -> dict[str, list[int]]: ...
    async def model_config(self, name: str, version: int) -> model_config_pb2.ModelConfig: ...


@dataclass(frozen=True)
class _Loaded:
    triton_name: str
    instances: int


@dataclass(frozen=True)
class _Failure:
    attempts: int
    retry_at: float  # when to try again (event-loop time)


class ModelLoader:
    """Loads and retires registry versions in one Triton, keeping the catalog in step."""

    def __init__(
        self,
        *,
        triton: TritonControl,
        catalog: ModelCatalog,
        repository: ModelRepository,
        cache: ArtifactCache,
        download: Download,
        retire_seconds: float,
        retire_max_seconds: float = 300.0,
        max_retry_seconds: float = 60.0,
        rejected_retry_seconds: float = 300.0,
    ) -> None:
        self._triton = triton
        self._catalog = catalog
        self._repository = repository
        self._cache = cache
        self._download = download
        self._retire_seconds = retire_seconds
        self._retire_max = max(retire_seconds, retire_max_seconds)
        self._max_retry = max_retry_seconds
        self._rejected_retry = rejected_retry_seconds
        self._loaded: dict[VersionKey, _Loaded] = {}
        self._failed: dict[VersionKey, _Failure] = {}
        self._retiring: dict[VersionKey, asyncio.Task[None]] = {}
        # One change to a model's Triton models at a time (loads, unloads, retirements);
        # models apart change side by side, so one slow load holds no other rollout back.
        self._locks: dict[str, asyncio.Lock] = {}
        self._working: dict[str, asyncio.Task[None]] = {}  # model -> its loads in progress
        self._leftovers: set[VersionKey] = set()  # failed, no longer wanted, not cleared
        # Called when a model's loads end: what a pass decides may have changed.
        self._on_change: Callable[[], None] = lambda: None

    def on_change(self, callback: Callable[[], None]) -> None:
        """`callback` runs each time a model's loads end (see `reconcile`)."""
        self._on_change = callback

    def loaded(self) -> set[VersionKey]:
        return set(self._loaded)

    def loading(self) -> list[str]:
        """The models whose loads are running now."""
        return sorted(self._working)

    async def adopt(self, wanted: Wanted) -> None:
        """At start: keeps what Triton already serves and is wanted, lets go of the rest.

        A remote Triton may still serve versions from before a worker restart;
        loading them again would reload them in place. One kept with other instances
        than wanted now is served until its replacement is loaded beside it. Anything
        else Triton has ready is unloaded, and folders this worker wrote that are not
        kept go.
        """
        for name, versions in (await self._triton.ready_versions()).items():
            ours = parse_triton_name(name)
            want = wanted.get((ours[0], ours[1])) if ours is not None else None
            if (
                want is not None
                and want.key not in self._loaded
                and TRITON_VERSION in versions
                and self._repository.has(name)
            ):
                config = await self._triton.model_config(name, TRITON_VERSION)
                self._loaded[want.key] = _Loaded(name, _instances(config))
                self._catalog.add(loaded_model(TRITON_VERSION, config))
                log.info("version already loaded; serving it", version=want.label)
                continue
            log.info("unloading what is not wanted", triton_model=name)
            await self._triton.unload_model(name)
        kept = {loaded.triton_name for loaded in self._loaded.values()}
        removed = await asyncio.to_thread(self._repository.sweep, kept)
        if removed:
            log.info("removed model folders not wanted", triton_models=removed)
        self._discard_artifacts(wanted, downloads=True)

    async def reconcile(
        self, wanted_now: Callable[[], Wanted], *, wait: float | None = None
    ) -> float | None:
        """One pass: starts each model's missing loads, schedules retirements.

        Each model's loads run on their own, one at a time; a model whose loads are
        still running from an earlier pass is left to them. With `wait` (seconds),
        returns once every model's loads have ended or that long has passed (the
        first pass: a worker is in sync then, and one load that hangs must not keep
        it from serving the rest); else at once. `on_change` is called as each
        model's loads end.

        `wanted_now` is asked again before each load, since a load takes seconds
        and the registry may have moved on. Returns the seconds until a failed
        load is due again, or None when none is.
        """
        self._forget(wanted_now())
        wanted = wanted_now()
        models = {key[0] for key in self._leftovers}
        models.update(model for (model, _), want in wanted.items() if self._due(want))
        for model in sorted(models - set(self._working)):
            work = asyncio.create_task(self._work_on(model, wanted_now), name=f"load-{model}")
            self._working[model] = work
        if wait is not None and self._working:
            await asyncio.wait(list(self._working.values()), timeout=wait)
        self._schedule_retirements(wanted_now)
        return self._next_retry()

    async def close(self) -> None:
        tasks = [*self._retiring.values(), *self._working.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lock_of(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def _work_on(self, model: str, wanted_now: Callable[[], Wanted]) -> None:
        """Clears what failed versions of `model` left, then loads its due versions."""
        try:
            async with self._lock_of(model):
                await self._clear_failed(model, wanted_now)
            for key in sorted(key for key in wanted_now() if key[0] == model):
                want = wanted_now().get(key)
                if want is not None and self._due(want):
                    async with self._lock_of(model):
                        await self._load(want)
        except Exception:
            # _load turns what it expects into retries; this is a bug or the disk.
            log.exception("loading a model's versions failed", model=model)
        finally:
            if self._working.get(model) is asyncio.current_task():
                del self._working[model]
            self._on_change()

    def _forget(self, wanted: Wanted) -> None:
        """Calls off retirements of versions wanted again; a failed version no longer
        wanted gets a fresh start if it is wanted again, and its leftovers are cleared."""
        for key in [key for key in self._failed if key not in wanted]:
            del self._failed[key]
            self._leftovers.add(key)
        self._leftovers.difference_update(wanted)
        for key in [key for key in self._retiring if key in wanted]:
            self._retiring.pop(key).cancel()
            log.info("retirement called off; the version is wanted again", version=_label(key))

    async def _clear_failed(self, model: str, wanted_now: Callable[[], Wanted]) -> None:
        """Removes what failed loads of `model`'s versions no longer wanted left behind:
        their Triton models and folders (a load can fail after Triton loaded the model,
        or Triton can go on loading after the call failed, so each is unloaded first)
        and their cached artifacts."""
        wanted = wanted_now()
        given_up = {key for key in self._leftovers if key[0] == model and key not in wanted}
        self._leftovers.difference_update(given_up)
        if not given_up:
            return
        serving = {loaded.triton_name for loaded in self._loaded.values()}
        for name in self._repository.names():
            ours = parse_triton_name(name)
            if ours is not None and (ours[0], ours[1]) in given_up and name not in serving:
                await self._let_go((ours[0], ours[1]), name)
        # Asked again: a version may have become wanted (and be downloading) meanwhile.
        self._discard_artifacts(wanted_now())

    def _due(self, want: WantedVersion) -> bool:
        loaded = self._loaded.get(want.key)
        if loaded is not None and loaded.instances == want.instances:
            return False
        failure = self._failed.get(want.key)
        return failure is None or failure.retry_at <= _now()

    async def _load(self, want: WantedVersion) -> None:
        version, label = want.version, want.label
        # A version loaded with other instances goes on serving until its replacement,
        # a Triton model of its own (model_repository.py), is loaded beside it.
        replaced = self._loaded.get(want.key)
        if replaced is not None and replaced.triton_name == triton_name(
            version.model, version.version, want.instances
        ):
            # Adopted from Triton under the name its replacement needs (written before
            # names told instances apart): that can only be reloaded after an unload.
            await self._unload(want.key)
            replaced = None
        try:
            artifact = await self._cache.cached(version)
            if artifact is None:
                artifact = await self._cache.store(
                    version, self._download(version.model, version.version)
                )
            name = await asyncio.to_thread(
                self._repository.write, version, artifact, instances=want.instances
            )
            await self._triton.load_model(name)
            config = await self._triton.model_config(name, TRITON_VERSION)
        except ArtifactRejected as exc:
            # Bytes that went bad in the registry's store can be healed there (an upload
            # of the same bytes replaces them), so they are fetched again, but seldom:
            # each try moves the whole artifact.
            attempts = self._failed[want.key].attempts + 1 if want.key in self._failed else 1
            self._failed[want.key] = _Failure(attempts, _now() + self._rejected_retry)
            log.error(
                "artifact rejected; this version is not loaded",
                version=label,
                reason=str(exc),
                attempts=attempts,
                retry_in_s=self._rejected_retry,
            )
            return
        except Exception as exc:
            attempts = self._failed[want.key].attempts + 1 if want.key in self._failed else 1
            delay = min(self._max_retry, _FIRST_RETRY_S * 2 ** (attempts - 1))
            self._failed[want.key] = _Failure(attempts=attempts, retry_at=_now() + delay)
            log.error(
                "could not load version; will retry",
                version=label,
                reason=f"{type(exc).__name__}: {exc}",
                attempts=attempts,
                retry_in_s=delay,
            )
            return
        self._failed.pop(want.key, None)
        self._loaded[want.key] = _Loaded(name, want.instances)
        # Replaces the catalog entry: calls from now on go to the new Triton model.
        self._catalog.add(loaded_model(TRITON_VERSION, config))
        log.info("version serving", version=label, triton_model=name, instances=want.instances)
        if replaced is not None and replaced.triton_name != name:
            # A call that picked the old Triton model a moment ago is on its way there.
            await asyncio.sleep(_SWITCH_DRAIN_S)
            await self._let_go(want.key, replaced.triton_name)

    def _schedule_retirements(self, wanted_now: Callable[[], Wanted]) -> None:
        wanted = wanted_now()
        for key in self._loaded:
            if key in wanted or key in self._retiring:
                continue
            replacements = [other for other in wanted if other[0] == key[0]]
            if all(other in self._loaded for other in replacements):
                log.info(
                    "retiring version once idle",
                    version=_label(key),
                    replaced_by=[_label(other) for other in sorted(replacements)],
                    idle_s=self._retire_seconds,
                    at_most_s=self._retire_max,
                )
                self._retiring[key] = asyncio.create_task(self._retire(key, wanted_now))

    async def _retire(self, key: VersionKey, wanted_now: Callable[[], Wanted]) -> None:
        try:
            await self._until_idle(key)
        finally:
            # Past the wait, a retirement is no longer called off by cancelling it (an
            # unload half done would be worse); the check under the lock covers that.
            if self._retiring.get(key) is asyncio.current_task():
                del self._retiring[key]
        async with self._lock_of(key[0]):
            if key in wanted_now() or key not in self._loaded:
                return
            await self._unload(key)
            self._discard_artifacts(wanted_now())

    async def _until_idle(self, key: VersionKey) -> None:
        """Returns once version `key` has had no call for `retire_seconds` since it was
        replaced, or `retire_max_seconds` after that, whichever comes first."""
        replaced = time.monotonic()
        while (loaded := self._loaded.get(key)) is not None:
            now = time.monotonic()
            last = max(replaced, self._catalog.last_used(loaded.triton_name) or replaced)
            wait = min(last + self._retire_seconds, replaced + self._retire_max) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _unload(self, key: VersionKey) -> None:
        loaded = self._loaded.pop(key)
        # Out of the catalog first, so no new call is routed to what goes next; a call
        # that resolved to it a moment ago is on its way to Triton.
        self._catalog.remove(*key)
        await asyncio.sleep(_SWITCH_DRAIN_S)
        await self._let_go(key, loaded.triton_name)

    async def _let_go(self, key: VersionKey, name: str) -> None:
        """Unloads Triton model `name` (calls in flight finish first) and removes its folder."""
        try:
            await self._triton.unload_model(name)
        except RuntimeError as exc:
            # Its folder stays: Triton may still be reading it. The next start sweeps it.
            log.error("could not unload", version=_label(key), triton_model=name, reason=str(exc))
            return
        await asyncio.to_thread(self._repository.remove, name)
        log.info("unloaded", version=_label(key), triton_model=name)

    def _discard_artifacts(self, wanted: Wanted, *, downloads: bool = False) -> None:
        # Downloads in progress belong to other models' loads, except at start.
        keep = {want.version.artifact.sha256 for want in wanted.values()}
        self._cache.discard(keep, downloads=downloads)

    def _next_retry(self) -> float | None:
        due = [f.retry_at for f in self._failed.values()]
        return max(0.0, min(due) - _now()) if due else None


def _instances(config: model_config_pb2.ModelConfig) -> int:
    return sum(group.count for group in config.instance_group)


def _label(key: VersionKey) -> str:
    return f"{key[0]}:{key[1]}"


def _now() -> float:
    return asyncio.get_running_loop().time()
