"""Builds and runs the worker: Triton (bundled or remote), its models, and the gRPC server.

Static mode loads the configured models at start. Registry mode (--registry) starts
with none and serves what the registry's deployments say (deployments.py); the
worker reports SERVING once it has caught up with the registry and tried each
wanted version once.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from tensorgate.worker.v1 import worker_pb2, worker_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from services.runtime.main import run_service
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import GrpcService, ServiceBinding, build_server
from services.runtime.tls import channel_credentials
from services.runtime.upstreams import open_upstream
from services.worker.catalog import LoadedModel, ModelCatalog, loaded_model
from services.worker.deployments import DeploymentSync
from services.worker.kserve_servicer import TritonPassthroughServicer
from services.worker.servicer import InferenceWorkerServicer
from services.worker.settings import REGISTRY_SERVICE, WorkerSettings
from services.worker.triton_client import TritonConnection
from services.worker.triton_process import BundledTriton

log = structlog.get_logger("tensorgate.worker")

_META_VALUE_MAX = 512  # Consul's limit on one Meta value
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"].full_name


# How often a Triton the worker did not start is checked for models it lost.
_TRITON_CHECK_S = 2.0


@dataclass
class Worker:
    """A running worker: its gRPC service, its Triton connection, maybe its own Triton."""

    service: GrpcService
    triton: TritonConnection
    bundled: BundledTriton | None
    catalog: ModelCatalog
    # Registry mode only.
    deployments: DeploymentSync | None = None
    # With --consul: keeps the models Meta of its Consul registration current.
    publisher: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.service.address

    async def wait_failed(self) -> str:
        """Returns why the worker can no longer serve: its bundled Triton exited, or the
        Triton it was given lost models the worker serves (it restarted)."""
        if self.bundled is None:
            reason = await self._wait_models_lost()
            await self.service.set_serving(False)
            return reason
        code = await self.bundled.wait_exited()
        await self.service.set_serving(False)
        return f"the bundled Triton exited with code {code}; log tail:\n{self.bundled.log_tail()}"

    async def _wait_models_lost(self) -> str:
        """Watches a Triton the worker did not start. Its outages surface per call
        (UNAVAILABLE) and in its own health; but a Triton that restarted (a sidecar the
        kubelet restarted) comes back with nothing loaded (explicit model control), and
        the worker would go on advertising models it cannot serve. A version missing
        from Triton twice in a row, while the worker still serves it, is that: the
        worker fails, and starts again loading what it serves (its start does)."""
        missing_before: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(_TRITON_CHECK_S)
            try:
                ready = await self.triton.ready_versions()
            except Exception:  # unreachable: calls say so; only a Triton that answers counts
                missing_before = set()
                continue
            served = {(m.triton_name, m.triton_version) for m in self.catalog.models()}
            missing = {
                (name, version)
                for name, version in served
                if int(version) not in ready.get(name, ())
            }
            lost = missing & missing_before
            if lost:
                names = ", ".join(f"{name}:{version}" for name, version in sorted(lost))
                return (
                    f"the Triton at {self.triton.url} no longer has {names} loaded (did it "
                    "restart?); the worker stops so that its next start loads them again"
                )
            missing_before = missing

    async def stop(self) -> None:
        async def draining() -> None:
            # Model watchers (gateways) end their streams now rather than holding
            # the shutdown for the whole grace period.
            self.catalog.close()

        try:
            await self.service.stop(on_draining=draining)
        finally:
            if self.publisher is not None:
                self.publisher.cancel()
            try:
                if self.deployments is not None:
                    await self.deployments.stop()
            finally:
                await self.triton.close()
                if self.bundled is not None:
                    await self.bundled.stop()


async def load_catalog(triton: TritonConnection, models: Sequence[str]) -> ModelCatalog:
    """Loads the models Triton does not have ready yet, then describes all it has ready.

    A model that is already ready is left alone: asking Triton to load it again
    reloads it when its files changed (the Python backend writes __pycache__ into
    the model folder), which disturbs calls in flight and, with Triton 2.51's
    Python-backend custom metrics, was seen to crash the server.
    """
    ready = await triton.ready_versions()
    for name in models:
        if name not in ready:
            await triton.load_model(name)
    ready = await triton.ready_versions()
    loaded = []
    for name, versions in ready.items():
        for version in versions:
            loaded.append(loaded_model(version, await triton.model_config(name, version)))
    return ModelCatalog(loaded)


async def start_worker(settings: WorkerSettings) -> Worker:
    """Starts Triton if needed, loads the models, and starts serving gRPC."""
    bundled: BundledTriton | None = None
    url = settings.triton_url
    if not url:
        repository = settings.served_repository
        if settings.registry:
            repository.mkdir(parents=True, exist_ok=True)  # the worker's own
        bundled = BundledTriton(repository, settings.data_dir, threads=settings.triton_threads)
        await bundled.start(settings.triton_start_timeout)
        url = bundled.grpc_url
    triton = TritonConnection(url)
    deployments: DeploymentSync | None = None
    publisher: asyncio.Task[None] | None = None
    try:
        await triton.wait_ready(settings.triton_start_timeout)
        if settings.registry:
            catalog = ModelCatalog()
            credentials = channel_credentials(
                settings.upstream_ca_file, settings.upstream_cert_file, settings.upstream_key_file
            )
            # host:port, or a healthy registry found through Consul (`consul`).
            channel = await open_upstream(
                settings.registry, REGISTRY_SERVICE, settings, credentials
            )
            deployments = DeploymentSync.open(
                settings, triton, catalog, credentials, channel=channel
            )
        else:
            catalog = await load_catalog(triton, settings.models)
        metrics = ServiceMetrics("worker")
        servicer = InferenceWorkerServicer(
            catalog, triton, stream_linger=settings.stream_linger_seconds
        )
        service = build_server(
            settings,
            [
                ServiceBinding.of(worker_pb2_grpc.add_InferenceWorkerServicer_to_server, servicer),
                # The gateway's KServe v2 calls, passed through to this Triton.
                ServiceBinding.of(
                    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                    TritonPassthroughServicer(catalog, triton),
                ),
            ],
            name="worker",
            metrics=metrics,
        )
        publisher = _publish_models(catalog, service)
        # Not SERVING until in sync with the registry: a gateway that routed here
        # before would find none of the models it expects.
        await service.start(serving=deployments is None)
        if deployments is not None:
            deployments.start(on_synced=lambda: service.set_serving(True))
    except BaseException:
        if publisher is not None:
            publisher.cancel()
        if deployments is not None:
            await deployments.stop()
        await triton.close()
        if bundled is not None:
            await bundled.stop()
        raise
    if deployments is not None:
        log.info("worker started; following the registry", registry=settings.registry, triton=url)
    else:
        log.info("worker ready", models=[m.label for m in catalog.models()], triton=url)
    return Worker(
        service=service,
        triton=triton,
        bundled=bundled,
        catalog=catalog,
        deployments=deployments,
        publisher=publisher,
    )


def models_meta(models: Sequence[LoadedModel]) -> dict[str, str]:
    """Consul Meta for the loaded versions: models="digits:1,tinylm:2".

    A Meta value holds at most 512 characters: past that, as many whole versions as
    fit, and models_more says how many were left out.
    """
    labels, shown, length = [m.label for m in models], [], 0
    for label in labels:
        if length + len(label) + 1 > _META_VALUE_MAX:
            break
        shown.append(label)
        length += len(label) + 1
    meta = {"models": ",".join(shown)}
    meta["models_more"] = str(len(labels) - len(shown)) if len(shown) < len(labels) else "0"
    return meta


def _publish_models(catalog: ModelCatalog, service: GrpcService) -> asyncio.Task[None] | None:
    registration = service.consul
    if registration is None:
        return None
    registration.set_meta(**models_meta(catalog.models()))  # registered with its first list

    async def publish() -> None:
        async for models in catalog.watch():  # ends when the catalog closes (draining)
            registration.set_meta(**models_meta(models))

    return asyncio.create_task(publish(), name="consul-models-meta")


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(WorkerSettings, start_worker, argv, prog="tensorgate-worker")


if __name__ == "__main__":
    sys.exit(main())
