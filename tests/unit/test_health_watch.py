"""Health Watch on a real in-process server: every watcher hears every change, however
many come and go, and a graceful stop ends the watches instead of waiting out its grace."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]  # grpc-stubs lacks it
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.metrics import ServiceMetrics
from services.runtime.server import GrpcService, ServiceBinding, build_server
from services.runtime.settings import ServiceSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _ticks(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """A stream of a few slow messages: in flight while the server stops."""
    for _ in range(5):
        await asyncio.sleep(0.1)
        yield b"t"


def _service(*, drain: float = 0.0, grace: float = 0.0) -> GrpcService:
    binding = ServiceBinding("test.Ticks", {"Ticks": grpc.unary_stream_rpc_method_handler(_ticks)})
    return build_server(
        ServiceSettings(drain_seconds=drain, grace_seconds=grace),
        [binding],
        name="health-test",
        metrics=ServiceMetrics("h"),
    )


def _watch(channel: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())


async def test_a_watcher_that_leaves_does_not_deafen_the_others() -> None:
    service = _service()
    await service.start()
    try:
        async with (
            grpc.aio.insecure_channel(service.address) as first,
            grpc.aio.insecure_channel(service.address) as second,
        ):
            staying, leaving = _watch(first), _watch(second)
            assert (await staying.read()).status == SERVING
            assert (await leaving.read()).status == SERVING
            leaving.cancel()
            await asyncio.sleep(0.2)  # its handler has ended on the server
            await service.set_serving(False)
            heard = await asyncio.wait_for(staying.read(), 10)
            assert heard.status == NOT_SERVING
            staying.cancel()
    finally:
        await service.stop()


async def test_stop_ends_the_watches_and_finishes_the_calls_in_flight() -> None:
    # A grace far longer than the test may take: only the watches ending lets it return.
    service = _service(drain=0.2, grace=120.0)
    await service.start()
    async with grpc.aio.insecure_channel(service.address) as channel:
        watch = _watch(channel)
        assert (await watch.read()).status == SERVING
        ticks = channel.unary_stream("/test.Ticks/Ticks", None, None)(b"")
        assert await ticks.read() == b"t"
        stopping = asyncio.ensure_future(service.stop())
        assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
        assert await asyncio.wait_for(watch.read(), 10) is EOF
        assert await watch.code() == grpc.StatusCode.OK
        rest = [await ticks.read() for _ in range(5)]
        assert rest == [b"t"] * 4 + [EOF] and await ticks.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 30)
