"""Health is SERVING while a service is up and NOT_SERVING while it shuts down."""

from __future__ import annotations

import asyncio

import grpc
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

from gateway import server as gateway_server
from gateway.settings import GatewaySettings
from services.worker import server as worker_server
from services.worker.triton_client import TritonConnection
from services.worker.triton_process import BundledTriton
from tests.conftest import worker_settings
from tests.helpers import health_status


async def test_serving_then_not_serving_during_shutdown(triton: BundledTriton) -> None:
    # Own instances (sharing the session's Triton), so stopping them harms no other test.
    worker = await worker_server.start_worker(
        worker_settings(triton, models=("digits",), drain_seconds=1.5)
    )
    gateway = await gateway_server.start_gateway(
        GatewaySettings(
            allow_anonymous=True,
            workers=(worker.address,),
            metrics_port=0,
            drain_seconds=1.5,
            grace_seconds=1.0,
        )
    )
    services = [
        (gateway.address, gateway_server.SERVICE_NAME),
        (worker.address, worker_server.SERVICE_NAME),
    ]
    for address, name in services:
        assert await health_status(address) == "SERVING"
        assert await health_status(address, name) == "SERVING"

    stopping = [asyncio.create_task(gateway.stop()), asyncio.create_task(worker.stop())]
    await asyncio.sleep(0.3)  # inside the drain window: still answering, not serving
    for address, name in services:
        assert await health_status(address) == "NOT_SERVING"
        assert await health_status(address, name) == "NOT_SERVING"
    await asyncio.gather(*stopping)
    # A worker that did not launch its Triton leaves it running.
    connection = TritonConnection(triton.grpc_url)
    try:
        await connection.wait_ready(timeout=5)
    finally:
        await connection.close()


async def test_in_flight_stream_finishes_during_graceful_shutdown(triton: BundledTriton) -> None:
    worker = await worker_server.start_worker(worker_settings(triton, grace_seconds=30.0))
    gateway = await gateway_server.start_gateway(
        GatewaySettings(
            allow_anonymous=True,
            workers=(worker.address,),
            metrics_port=0,
            drain_seconds=0.0,
            grace_seconds=30.0,
        )
    )
    prompt = "ROMEO:\n"
    request = inference_pb2.GenerateRequest(
        model="tinylm", prompt=prompt, max_tokens=200, temperature=0.0
    )
    chunks: list[inference_pb2.GenerateChunk] = []
    stopping: list[asyncio.Task[None]] = []
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        async for chunk in gateway_pb2_grpc.InferenceGatewayStub(channel).Generate(request):
            chunks.append(chunk)
            if not stopping:  # the stream is under way: shut both down while it runs
                stopping = [asyncio.create_task(gateway.stop()), asyncio.create_task(worker.stop())]
        await asyncio.gather(*stopping)
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 200
