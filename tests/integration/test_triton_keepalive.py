"""The worker's keepalive pings against a real bundled Triton: Triton takes them, idle
or not, instead of answering GOAWAY too_many_pings and dropping the connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from tensorgate.channel_options import CHANNEL_OPTIONS
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.worker.triton_process import BundledTriton
from tests.conftest import MODEL_REPOSITORY

pytestmark = pytest.mark.integration

# The worker pings every 30 s; a Triton launched for pings every second shows in a few
# seconds what the real one would after a minute and a half of idling.
PING_MS = 1_000


async def test_triton_keeps_an_idle_connection_the_worker_pings(tmp_path: Path) -> None:
    triton = BundledTriton(MODEL_REPOSITORY, tmp_path, threads=1, ping_interval_ms=PING_MS)
    await triton.start(timeout=120)
    options = [*dict(CHANNEL_OPTIONS, **{"grpc.keepalive_time_ms": PING_MS}).items()]
    try:
        async with grpc.aio.insecure_channel(triton.grpc_url, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)).live
            # Idle, pinged each second: Triton's defaults say GOAWAY at the third ping,
            # and the channel would then have left READY (it goes IDLE until a call).
            await asyncio.sleep(6 * PING_MS / 1000)
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            assert (await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)).live
    finally:
        await triton.stop()
