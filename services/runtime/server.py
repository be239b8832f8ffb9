"""The gRPC server every service runs: pipeline, health, reflection, metrics, TLS, shutdown.

`build_server(settings, bindings, metrics=...)` gives a `GrpcService` bound to its
port (0 picks a free one) and `start` starts it (and, with --consul, registers it in
Consul: consul.py); `stop` shuts it down gracefully: health goes NOT_SERVING first, it
leaves Consul, new calls are still taken for `drain_seconds` so load balancers and
discovery notice, then in-flight calls get `grace_seconds` to finish (health Watch
streams end first: they are not work in flight, and `stop` returns as soon as the real
calls are done).
A new service is its settings, its servicers (as `ServiceBinding`s) and a few lines
that call `build_server`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorgate.channel_options import MAX_MESSAGE_BYTES

from services.runtime.access import Authenticator, QuotaGate
from services.runtime.consul import ConsulAgent, ConsulRegistration
from services.runtime.health import HealthService
from services.runtime.metrics import MetricsEndpoint, ServiceMetrics
from services.runtime.pipeline import Pipeline
from services.runtime.settings import ServiceSettings
from services.runtime.tls import server_credentials

log = structlog.get_logger("tensorgate.server")

SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Clients (channels.py) ping every 30 s, idle or not; allow that.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # grpc sets SO_REUSEPORT by default, so a second server on a taken port would
    # silently share it; a taken port must be an error at start instead.
    ("grpc.so_reuseport", 0),
)


class _HandlerCapture:
    """Stands in for a server while a generated `add_*Servicer_to_server` registers."""

    def __init__(self) -> None:
        self.services: dict[str, Mapping[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers also arrive by name, below

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services[service] = handlers


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service a server offers: its full name and its method handlers."""

    name: str
    handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]

    @classmethod
    def of(cls, add_to_server: Callable[[Any, Any], None], servicer: object) -> ServiceBinding:
        """From generated code: `ServiceBinding.of(add_FooServicer_to_server, FooServicer())`."""
        capture = _HandlerCapture()
        add_to_server(servicer, capture)
        ((name, handlers),) = capture.services.items()
        return cls(name, handlers)


class GrpcService:
    """One service's gRPC server with its pipeline, health, reflection and metrics."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        name: str,
        bindings: Sequence[ServiceBinding],
        metrics: ServiceMetrics,
        authenticator: Authenticator | None = None,
        quota: QuotaGate | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.metrics = metrics
        self.health = HealthService()
        self._service_names = tuple(b.name for b in bindings)
        self.server = grpc.aio.server(options=list(SERVER_OPTIONS))
        # The pipeline wraps each handler once, here, rather than intercepting per call;
        # health and reflection stay outside it (infrastructure, no per-call line).
        self._pipeline = pipeline = Pipeline(metrics, authenticator=authenticator, quota=quota)
        for binding in bindings:
            wrapped = {
                method: pipeline.wrap(f"/{binding.name}/{method}", handler)
                for method, handler in binding.handlers.items()
            }
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(binding.name, wrapped),)
            )
            self.server.add_registered_method_handlers(binding.name, wrapped)  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        credentials = server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
        try:
            self.port = (
                self.server.add_secure_port(settings.address, credentials)
                if credentials is not None
                else self.server.add_insecure_port(settings.address)
            )
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(f"{name}: cannot listen on {settings.address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"{name}: cannot listen on {settings.address}")
        self.tls = credentials is not None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._serving = False
        # Registered once started; Meta (a worker's models) may be set before that.
        self.consul: ConsulRegistration | None = None
        if settings.consul:
            self.consul = ConsulRegistration(
                ConsulAgent(settings.consul, token=settings.consul_token.get_secret_value()),
                name=f"tensorgate-{name}",
                address=settings.advertise_address or self.address,
                tls=self.tls,
                check_interval=settings.consul_check_interval,
                deregister_after=settings.consul_deregister_after,
                serving=lambda: self._serving,
            )

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self, *, serving: bool = True) -> None:
        """Starts serving (and registers in Consul, with --consul); on failure (a taken
        metrics port, ...) nothing is left listening.

        `serving=False` starts with health NOT_SERVING, for a service that must catch up
        with something first (a worker with its registry) and says SERVING itself.
        """
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
            if self.consul is not None:
                await self.consul.agent.close()
            raise
        await self.set_serving(serving)
        if self.consul is not None:
            self.consul.start()  # in the background: an agent that is away is retried
        log.info(
            "serving",
            service=self.name,
            address=self.address,
            tls="mutual" if self.settings.tls_client_ca_file and self.tls else self.tls,
            metrics_port=self.metrics_endpoint.port if self.metrics_endpoint else None,
        )

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._serving = serving
        for service in ("", *self._service_names):
            await self.health.set(service, status)

    async def stop(self, on_draining: Callable[[], Awaitable[None]] | None = None) -> None:
        """NOT_SERVING, out of Consul, optional hook, drain, then stop with grace."""
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
        self._serving = False
        if self.consul is not None:
            # Out of Consul first, so gateways stop sending new calls here now, not
            # only once the agent's next check fails.
            await self.consul.deregister()
            await self.consul.agent.close()
        if on_draining is not None:
            await on_draining()
        await asyncio.sleep(self.settings.drain_seconds)
        # Watchers have heard NOT_SERVING; their streams would hold the stop below
        # for the whole grace period, which is for the calls in flight.
        await self.health.end_watches()
        grace = self.settings.grace_seconds
        # Just before grpc cancels what is left, so those calls are told apart.
        cut_off = asyncio.get_running_loop().call_later(
            max(0.0, grace - 0.01), lambda: setattr(self._pipeline, "cut_off", True)
        )
        try:
            await self.server.stop(grace)
        finally:
            cut_off.cancel()
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


def build_server(
    settings: ServiceSettings,
    bindings: Sequence[ServiceBinding],
    *,
    name: str,
    metrics: ServiceMetrics,
    authenticator: Authenticator | None = None,
    quota: QuotaGate | None = None,
) -> GrpcService:
    """A service's server, bound to its port but not yet started (`await service.start()`)."""
    return GrpcService(
        settings,
        name=name,
        bindings=bindings,
        metrics=metrics,
        authenticator=authenticator,
        quota=quota,
    )


class _Store(Protocol):
    async def close(self) -> None: ...


StoreT = TypeVar("StoreT", bound=_Store)


@dataclass
class StoredService(Generic[StoreT]):
    """A running service whose state lives in a database (the registry, auth): its gRPC
    service over its store. A lost database fails the calls that need it until it is
    back; nothing stops the service itself."""

    service: GrpcService
    store: StoreT

    @property
    def address(self) -> str:
        return self.service.address

    async def wait_failed(self) -> str:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        try:
            await self.service.stop()
        finally:
            await self.store.close()
