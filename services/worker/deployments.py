"""Registry mode: the worker serves what the registry's deployments say.

`DeploymentSync` follows the change feed (registry_feed.py) and hands each new
desired state to the loader (model_loader.py). At start it first catches up with
the feed, lets go of whatever Triton has that is not wanted, and tries each
wanted version once; then it reports the worker in sync (`on_synced`, which makes
it SERVING), however many versions failed: those are retried in the background
rather than holding the worker back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable

import grpc
import structlog
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.runtime.channels import open_channel
from services.worker.artifact_cache import ArtifactCache
from services.worker.catalog import ModelCatalog
from services.worker.desired_state import VersionKey, WantedVersion
from services.worker.model_loader import ModelLoader
from services.worker.model_repository import ModelRepository
from services.worker.registry_feed import RegistryFeed
from services.worker.settings import WorkerSettings
from services.worker.triton_client import TritonConnection

log = structlog.get_logger("tensorgate.worker.registry")

# After an unexpected error in a pass (a Triton that stopped answering, ...).
_PASS_RETRY_S = 2.0


class DeploymentSync:
    """Keeps one worker's Triton and catalog in step with the registry."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        loader: ModelLoader,
        *,
        max_backoff: float = 3.0,
        sync_wait: float = 300.0,
    ) -> None:
        self._channel = channel
        self._sync_wait = sync_wait
        self.feed = RegistryFeed(channel, max_backoff=max_backoff)
        self.loader = loader
        # A model's loads ending is a reason for another pass (retire what they replace).
        loader.on_change(self.feed.wake)
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def open(
        cls,
        settings: WorkerSettings,
        triton: TritonConnection,
        catalog: ModelCatalog,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> DeploymentSync:
        """Over `channel` (found through Consul, say), or one opened to --registry."""
        if channel is None:
            channel = open_channel(settings.registry, credentials)
        stub = registry_pb2_grpc.ModelRegistryStub(channel)

        def download(
            model: str, version: int
        ) -> AsyncIterable[registry_pb2.DownloadVersionResponse]:
            return stub.DownloadVersion(
                registry_pb2.DownloadVersionRequest(model=model, version=version)
            )

        loader = ModelLoader(
            triton=triton,
            catalog=catalog,
            repository=ModelRepository(settings.served_repository),
            cache=ArtifactCache(settings.artifact_cache),
            download=download,
            retire_seconds=settings.retire_seconds,
            retire_max_seconds=settings.retire_max_seconds,
            rejected_retry_seconds=settings.rejected_retry_seconds,
        )
        return cls(channel, loader, sync_wait=settings.sync_wait_seconds)

    def start(self, on_synced: Callable[[], Awaitable[None]]) -> None:
        """Starts following the registry; `on_synced` runs once, after the first pass."""
        self._tasks = [
            asyncio.create_task(self.feed.run(), name="registry-feed"),
            asyncio.create_task(self._reconcile(on_synced), name="deployment-sync"),
        ]

    def _wanted(self) -> dict[VersionKey, WantedVersion]:
        # The feed may replace its state (a registry whose history was reset).
        return self.feed.state.wanted()

    async def _reconcile(self, on_synced: Callable[[], Awaitable[None]]) -> None:
        await self.feed.caught_up.wait()
        while True:
            try:
                await self.loader.adopt(self._wanted())
                break
            except Exception:
                log.exception("could not inspect Triton's models; trying again")
                await asyncio.sleep(_PASS_RETRY_S)
        first = True
        while True:
            try:
                # The first pass waits for the loads (at most --sync-wait-seconds): the
                # worker is in sync after it, serving what could be loaded.
                wait = self._sync_wait if first else None
                retry_in = await self.loader.reconcile(self._wanted, wait=wait)
            except Exception:
                log.exception("deployment pass failed; trying again")
                retry_in = _PASS_RETRY_S
            if first:
                first = False
                self._report_start()
                self.synced.set()
                await on_synced()
            await self.feed.wait_changed(retry_in)
            # Only after a registry reset is it ever clear again (a replay in progress).
            await self.feed.caught_up.wait()

    def _report_start(self) -> None:
        wanted = self._wanted()
        loaded = self.loader.loaded()
        log.info(
            "in sync with the registry",
            revision=self.feed.state.revision,
            serving=sorted(f"{m}:{v}" for m, v in loaded),
            not_loaded=sorted(w.label for k, w in wanted.items() if k not in loaded),
            still_loading=self.loader.loading(),
        )
        unresolved = self.feed.state.unresolved()
        if unresolved:
            log.warning("deployments of versions the registry never described", targets=unresolved)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.loader.close()
        await self._channel.close(None)
