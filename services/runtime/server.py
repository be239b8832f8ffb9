"""The gRPC server every service runs: health, reflection, interceptors, metrics, shutdown.

`GrpcService.start` gives a started server on the configured port (0 picks a
free one) and `stop` shuts it down gracefully: health goes NOT_SERVING first,
new calls are still taken for `drain_seconds` so load balancers and discovery
notice, then in-flight calls get `grace_seconds` to finish. `serve_until_signalled`
runs that on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.interceptors import ServiceInterceptor
from services.runtime.metrics import MetricsEndpoint, ServiceMetrics
from services.runtime.settings import ServiceSettings

log = structlog.get_logger("tensorgate.server")

# Big enough for image batches; keepalive lets idle long-lived channels survive
# middleboxes and notices dead peers.
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # grpc sets SO_REUSEPORT by default, so a second server on a taken port would
    # silently share it; a taken port must be an error at start instead.
    ("grpc.so_reuseport", 0),
)

Register = Callable[[grpc.aio.Server], None]


class GrpcService:
    """One service's gRPC server with its health, reflection and metrics."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        name: str,
        service_names: Sequence[str],
        register: Register,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.name = name
        self.metrics = metrics
        # grpc-stubs predates the asyncio health servicer.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._service_names = tuple(service_names)
        self.server = grpc.aio.server(
            interceptors=[ServiceInterceptor(metrics)], options=list(SERVER_OPTIONS)
        )
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        try:
            self.port = self.server.add_insecure_port(settings.address)
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"{name}: cannot listen on {settings.address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"{name}: cannot listen on {settings.address}")
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Starts serving; on failure (a taken metrics port, ...) nothing is left listening."""
        try:
            if self.settings.metrics_port >= 0:
                self.metrics_endpoint = MetricsEndpoint(
                    self.metrics.registry, self.settings.host, self.settings.metrics_port
                )
            await self.server.start()
        except BaseException:
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
            await self.server.stop(None)
            raise
        await self.set_serving(True)
        log.info(
            "serving",
            service=self.name,
            address=self.address,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *self._service_names):
            await self.health.set(service, status)

    async def stop(self, on_draining: Callable[[], Awaitable[None]] | None = None) -> None:
        """NOT_SERVING, drain, optional hook (deregister, ...), then stop with grace."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(on_draining))
        await asyncio.shield(self._stopping)

    async def _stop(self, on_draining: Callable[[], Awaitable[None]] | None) -> None:
        log.info(
            "shutting down",
            service=self.name,
            drain_s=self.settings.drain_seconds,
            grace_s=self.settings.grace_seconds,
        )
        await self.health.enter_graceful_shutdown()
        if on_draining is not None:
            await on_draining()
        await asyncio.sleep(self.settings.drain_seconds)
        await self.server.stop(self.settings.grace_seconds)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        log.info("stopped", service=self.name)


async def wait_for_signal() -> None:
    """Returns on the first SIGINT or SIGTERM.

    The handlers stay installed: a second signal during the graceful shutdown
    must not kill the process before it has stopped what it started (Triton).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
