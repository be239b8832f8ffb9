"""Builds and runs the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tensorgate.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.aliases import AliasRouting
from gateway.control_plane import ControlPlane
from gateway.discovery import ConsulDiscovery, StaticDiscovery
from gateway.kserve_quota import metered_infer
from gateway.kserve_servicer import KServeGatewayServicer
from gateway.metrics import GatewayMetrics
from gateway.routing import RoutingPolicy
from gateway.servicer import InferenceGatewayServicer
from gateway.settings import GatewaySettings
from gateway.worker_pool import WorkerPool
from services.runtime.consul import ConsulAgent
from services.runtime.main import run_service
from services.runtime.server import GrpcService, ServiceBinding, build_server
from services.runtime.tls import channel_credentials

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["InferenceGateway"].full_name


@dataclass
class Gateway:
    service: GrpcService
    pool: WorkerPool
    control: ControlPlane
    discovery: StaticDiscovery | ConsulDiscovery | None = None

    @property
    def address(self) -> str:
        return self.service.address

    async def wait_failed(self) -> str:
        """The gateway has no part whose loss stops it: workers come and go."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        try:
            await self.service.stop()
        finally:
            await self.pool.close()
            await self.control.close()
            if isinstance(self.discovery, ConsulDiscovery):
                await self.discovery.close()


async def start_gateway(settings: GatewaySettings) -> Gateway:
    credentials = channel_credentials(
        settings.upstream_ca_file, settings.upstream_cert_file, settings.upstream_key_file
    )
    metrics = GatewayMetrics()
    control = await ControlPlane.open(settings, credentials, metrics)
    aliases = control.aliases
    discovery = await _discovery(settings)
    pool = WorkerPool(
        discovery,
        refresh_seconds=settings.refresh_seconds,
        eject_seconds=settings.eject_seconds,
        credentials=credentials,
        aliases=AliasRouting(aliases) if aliases is not None else None,
        policy=RoutingPolicy(
            max_outstanding=settings.max_outstanding_per_worker,
            queue_size=settings.queue_size,
            queue_seconds=settings.queue_seconds,
            eject_max_seconds=max(settings.eject_max_seconds, settings.eject_seconds),
            eject_after_failures=settings.eject_after_failures,
        ),
        metrics=metrics,
    )
    try:
        await pool.start()
        if aliases is not None:
            # Briefly, so the first alias calls are not refused; a registry that is
            # down shows as UNAVAILABLE on alias calls and the feed keeps trying.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(aliases.synced.wait(), 5.0)
        servicer = InferenceGatewayServicer(
            pool, metrics, upstream_timeout=settings.upstream_timeout
        )
        if control.quota is not None:
            # ModelInfer is metered as the Infer it stands for.
            control.quota.meter_as(service_pb2.ModelInferRequest, metered_infer)
        kserve = KServeGatewayServicer(
            pool, metrics, upstream_timeout=settings.upstream_timeout, quota=control.quota
        )
        bindings = [
            ServiceBinding.of(gateway_pb2_grpc.add_InferenceGatewayServicer_to_server, servicer),
            ServiceBinding.of(service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, kserve),
            *control.bindings,
        ]
        service = build_server(
            settings,
            bindings,
            name="gateway",
            metrics=metrics,
            authenticator=control.authenticator,
            quota=control.quota,
        )
        await service.start()
    except BaseException:
        await pool.close()
        await control.close()
        if isinstance(discovery, ConsulDiscovery):
            await discovery.close()
        raise
    return Gateway(service=service, pool=pool, control=control, discovery=discovery)


async def _discovery(settings: GatewaySettings) -> StaticDiscovery | ConsulDiscovery:
    """The static --workers list, or (`--workers consul`) the workers healthy in Consul."""
    service = settings.worker_service
    if service is None:
        return StaticDiscovery(list(settings.workers))
    agent = ConsulAgent(settings.consul, token=settings.consul_token.get_secret_value())
    discovery = ConsulDiscovery(agent, service, settle=max(3 * settings.consul_check_interval, 1))
    await discovery.start(first_wait=settings.consul_wait_seconds)
    return discovery


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(GatewaySettings, start_gateway, argv, prog="tensorgate-gateway")


if __name__ == "__main__":
    sys.exit(main())
