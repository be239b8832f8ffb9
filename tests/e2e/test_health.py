"""Health is SERVING while a service is up and NOT_SERVING while it shuts down."""

from __future__ import annotations

import asyncio

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
        GatewaySettings(workers=(worker.address,), drain_seconds=1.5, grace_seconds=1.0)
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
