"""Channels to the tensorgate services a service calls, given as host:port or found
through Consul.

`open_upstream` is how a gateway or worker reaches the registry or the auth service:
a `host:port` setting gives an ordinary long-lived channel (channels.py); `consul` or
`consul:NAME` gives a `FollowingChannel`, which waits (a bounded time) at start for a
healthy instance, then follows the service in Consul and moves to another healthy
instance when its own leaves the healthy set (deregistered while draining, failing
its check). Callers hold it like any channel: stubs made on it send each call to the
instance current at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any, cast

import grpc
import structlog

from services.runtime.channels import open_channel
from services.runtime.consul import ConsulAgent, HealthyInstance, follow_healthy
from services.runtime.settings import ServiceSettings, consul_service

log = structlog.get_logger("tensorgate.upstreams")


class _FollowingCall:
    """A multi-callable that sends each call over the owner's current channel."""

    def __init__(self, owner: FollowingChannel, kind: str, method: str, kwargs: Any) -> None:
        self._owner, self._kind, self._method, self._kwargs = owner, kind, method, kwargs
        self._bound: tuple[grpc.aio.Channel | None, Any] = (None, None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        channel = owner.current
        bound_to, multicallable = self._bound
        if bound_to is not channel:  # made once per instance, not per call
            multicallable = getattr(channel, self._kind)(self._method, **self._kwargs)
            self._bound = (channel, multicallable)
        call = multicallable(*args, **kwargs)
        # Counted per channel: a channel whose instance left closes once its calls end.
        owner.in_flight[channel] = owner.in_flight.get(channel, 0) + 1
        call.add_done_callback(lambda _: owner.ended(channel))
        return call


class FollowingChannel(grpc.aio.Channel):
    """A channel to whichever healthy instance of a Consul service it was last moved to."""

    def __init__(
        self,
        agent: ConsulAgent,
        service: str,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        wait: float = 30.0,
        settle: float = 15.0,
    ) -> None:
        self.agent, self.service = agent, service
        self._credentials = credentials
        self._wait, self._settle = wait, settle
        self.address = ""
        self._current: grpc.aio.Channel | None = None
        # Calls not ended yet, per channel (this instance's, and those of instances left).
        self.in_flight: dict[grpc.aio.Channel, int] = {}
        # Channels of instances that left, closed once their last call ends.
        self._retired: set[grpc.aio.Channel] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self._found = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> grpc.aio.Channel:
        assert self._current is not None, "FollowingChannel.start() not awaited"
        return self._current

    async def start(self, timeout: float) -> None:
        """Follows the service; OSError if no instance is healthy within `timeout`."""
        self._task = asyncio.create_task(self._follow(), name=f"upstream-{self.service}")
        try:
            await asyncio.wait_for(self._found.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise OSError(
                f"no healthy instance of {self.service} in Consul (agent {self.agent.address}) "
                f"within {timeout:g}s: start it, or check its health check in Consul"
            ) from None

    async def _follow(self) -> None:
        async for instances in follow_healthy(
            self.agent, self.service, wait=self._wait, settle=self._settle
        ):
            self._move(instances)

    def _move(self, instances: Sequence[HealthyInstance]) -> None:
        addresses = [i.address for i in instances]
        if not addresses or self.address in addresses:
            return  # none better to go to, or ours is still healthy
        # At random, so the gateways spread over the instances.
        address = random.choice(addresses)  # not for security
        previous, self._current = self._current, open_channel(address, self._credentials)
        log.info("upstream instance", service=self.service, address=address, left=self.address)
        self.address = address
        self._found.set()
        if previous is not None:
            # Not closed with a grace: grpc would cancel its streams at once (a Watch, a
            # proxied stream), which their callers see as cancelled, not as ended. The
            # instance that left ends them itself as it stops.
            self._retired.add(previous)
            if not self.in_flight.get(previous):
                self._close_retired(previous)

    def ended(self, channel: grpc.aio.Channel) -> None:
        """A call on `channel` ended."""
        left = self.in_flight.get(channel, 1) - 1
        if left > 0:
            self.in_flight[channel] = left
            return
        self.in_flight.pop(channel, None)
        if channel in self._retired:
            self._close_retired(channel)

    def _close_retired(self, channel: grpc.aio.Channel) -> None:
        self._retired.discard(channel)
        task = asyncio.get_running_loop().create_task(channel.close(None))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, "unary_unary", method, _kwargs(args, kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, "unary_stream", method, _kwargs(args, kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, "stream_unary", method, _kwargs(args, kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _FollowingCall(self, "stream_stream", method, _kwargs(args, kwargs))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*self._retiring, return_exceptions=True)
        retired, self._retired = list(self._retired), set()
        for channel in retired:
            await channel.close(None)
        if self._current is not None:
            await self._current.close(grace)
        await self.agent.close()

    async def __aenter__(self) -> FollowingChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)


def _kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("request_serializer", "response_deserializer")
    return {**dict(zip(names, args, strict=False)), **kwargs}


async def open_upstream(
    address: str,
    default_service: str,
    settings: ServiceSettings,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to `address` (host:port), or to a healthy instance of the Consul service
    it names (`consul` -> `default_service`, `consul:NAME`), waiting for one at most
    `settings.consul_wait_seconds` (OSError if none)."""
    service = consul_service(address, default_service)
    if service is None:
        return open_channel(address, credentials)
    agent = ConsulAgent(settings.consul, token=settings.consul_token.get_secret_value())
    channel = FollowingChannel(
        agent, service, credentials, settle=max(3 * settings.consul_check_interval, 1.0)
    )
    await channel.start(settings.consul_wait_seconds)
    return cast(grpc.aio.Channel, channel)
