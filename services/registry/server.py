"""Builds and runs the model registry: its store, its artifacts and the gRPC server."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.registry.artifacts import LocalArtifactStore
from services.registry.optimization.runner import JobRunner
from services.registry.servicer import ModelRegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from services.runtime.main import run_service
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import ServiceBinding, StoredService, build_server
from services.runtime.tls import channel_credentials
from services.store.database import database_url

log = structlog.get_logger("tensorgate.registry")

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"].full_name


@dataclass
class Registry(StoredService[RegistryStore]):
    """A running registry: its gRPC service over its store and its artifacts."""

    artifacts: LocalArtifactStore
    runner: JobRunner

    async def stop(self) -> None:
        try:
            await self.runner.close()
            await super().stop()
        finally:
            self.artifacts.close()


async def start_registry(settings: RegistrySettings) -> Registry:
    """Opens (and migrates) the store, sweeps unreferenced artifacts, starts serving."""
    url = database_url(settings.database_url.get_secret_value(), settings.data_dir, "registry")
    artifacts = LocalArtifactStore(settings.artifacts_path)
    store = await RegistryStore.open(url)
    runner: JobRunner | None = None
    try:
        # An upload whose version was never committed (a crash between storing the bytes
        # and the database row) left a blob no version names: nothing can see it, and
        # it goes here, before any upload of ours could be racing with the sweep (one
        # of another registry on the same store is left alone: see collect_garbage).
        swept = await artifacts.collect_garbage(store.referenced_artifacts)
        if swept:
            log.info("removed unreferenced artifacts", count=swept)
        runner = JobRunner(
            store,
            artifacts,
            workers=settings.workers,
            credentials=channel_credentials(
                settings.upstream_ca_file, settings.upstream_cert_file, settings.upstream_key_file
            ),
            latency_calls=settings.latency_calls,
            load_timeout=settings.load_timeout_seconds,
            evaluation_dir=settings.evaluation_dir,
            max_bytes=settings.max_artifact_bytes,
        )
        # Jobs a stopped registry left unfinished end as failed, their versions removed.
        await runner.recover()
        servicer = ModelRegistryServicer(
            store,
            artifacts,
            runner=runner,
            max_bytes=settings.max_artifact_bytes,
            chunk_bytes=settings.chunk_bytes,
            max_uploads=settings.max_uploads,
            upload_idle_seconds=settings.upload_idle_seconds,
        )
        service = build_server(
            settings,
            [ServiceBinding.of(registry_pb2_grpc.add_ModelRegistryServicer_to_server, servicer)],
            name="registry",
            metrics=ServiceMetrics("registry"),
        )
        await service.start()
    except BaseException:
        if runner is not None:
            await runner.close()
        await store.close()
        artifacts.close()
        raise
    log.info("registry ready", revision=await store.feed.current_revision())
    return Registry(service=service, store=store, artifacts=artifacts, runner=runner)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(RegistrySettings, start_registry, argv, prog="tensorgate-registry")


if __name__ == "__main__":
    sys.exit(main())
