"""The gateway's links to the control plane: the registry (aliases, its API) and the auth
service (keys, quotas, prices, the usage ledger), each over one long-lived channel, to
the address given or to a healthy instance found through Consul (`--registry consul`).

`ControlPlane.open(settings)` builds what the settings ask for and nothing else: with
no registry, aliases are refused; with no auth service (and --allow-anonymous), calls
carry no principal and nothing is metered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import grpc

from gateway.aliases import AliasFeed
from gateway.authentication import KeyAuthenticator, check_model_scope
from gateway.ledger import UsageLedger
from gateway.local_counters import InProcessCounters
from gateway.metrics import GatewayMetrics
from gateway.prices import PriceBook
from gateway.quota import QuotaGate
from gateway.redis_counters import RedisCounters
from gateway.service_proxy import AUTH, AUTH_INTERNAL, REGISTRY, ServiceProxy
from gateway.settings import AUTH_SERVICE, REGISTRY_SERVICE, GatewaySettings
from services.runtime.server import ServiceBinding
from services.runtime.upstreams import open_upstream


@dataclass
class ControlPlane:
    aliases: AliasFeed | None = None
    authenticator: KeyAuthenticator | None = None
    quota: QuotaGate | None = None
    bindings: list[ServiceBinding] = field(default_factory=list)
    _ledger: UsageLedger | None = None
    _prices: PriceBook | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @classmethod
    async def open(
        cls,
        settings: GatewaySettings,
        credentials: grpc.ChannelCredentials | None,
        metrics: GatewayMetrics,
    ) -> ControlPlane:
        plane = cls()
        try:
            if settings.registry:
                channel = await plane._channel(
                    settings.registry, REGISTRY_SERVICE, settings, credentials
                )
                plane.aliases = AliasFeed(settings.registry, channel=channel)
                plane.aliases.start()
                plane.bindings.append(
                    ServiceProxy(
                        REGISTRY,
                        channel,
                        subject="the model registry",
                        # Reads too: a download is another team's weights and code, and
                        # listings name every model; tenants see what they may call
                        # through the inference API's ListModels.
                        admin_only=frozenset(m.name for m in REGISTRY.methods),
                    ).binding()
                )
            if settings.auth:
                await plane._open_auth(settings, credentials, metrics)
        except BaseException:
            await plane.close()
            raise
        return plane

    async def _channel(
        self,
        address: str,
        consul_service: str,
        settings: GatewaySettings,
        credentials: grpc.ChannelCredentials | None,
    ) -> grpc.aio.Channel:
        # host:port, or a healthy instance found through Consul (`consul`).
        channel = await open_upstream(address, consul_service, settings, credentials)
        self._channels.append(channel)
        return channel

    async def _open_auth(
        self,
        settings: GatewaySettings,
        credentials: grpc.ChannelCredentials | None,
        metrics: GatewayMetrics,
    ) -> None:
        channel = await self._channel(settings.auth, AUTH_SERVICE, settings, credentials)
        self.authenticator = KeyAuthenticator(
            channel,
            cache_seconds=settings.auth_cache_seconds,
            outage_seconds=settings.auth_outage_seconds,
        )
        self.authenticator.start()
        self._prices = PriceBook(channel, refresh_seconds=settings.price_refresh_seconds)
        await self._prices.start()
        self._ledger = UsageLedger(channel, spool_dir=settings.data_dir / "usage-spool")
        self._ledger.start()
        redis_url = settings.redis_url.get_secret_value()
        counters: InProcessCounters | RedisCounters = InProcessCounters()
        if redis_url:
            counters = RedisCounters(
                redis_url,
                fail_open=settings.quota_fail_open,
                on_lost=metrics.quota_give_backs_lost.inc,
            )
            try:
                await counters.check_server()  # Redis 7+, or the gateway does not start
            except BaseException:
                await counters.close()
                raise
        self.quota = QuotaGate(
            counters,
            prices=self._prices.price,
            usage=self._ledger,
            max_call_s=settings.upstream_timeout,
            # The key may call the model: checked before anything is reserved.
            admits=check_model_scope,
        )
        self.bindings.append(
            ServiceProxy(AUTH, channel, subject="the auth service", hidden=AUTH_INTERNAL).binding()
        )

    async def close(self) -> None:
        """Stops the feeds; what calls used is sent to the ledger before the channels close."""
        if self.aliases is not None:
            await self.aliases.close()
        if self._prices is not None:
            await self._prices.close()
        if self.quota is not None:
            await self.quota.close()
        if self._ledger is not None:
            await self._ledger.close()
        if self.authenticator is not None:
            await self.authenticator.close()
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close(None)
