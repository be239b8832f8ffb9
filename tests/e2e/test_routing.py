"""The gateway routes around a worker that went away: retry once, eject, or UNAVAILABLE."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from gateway.server import start_gateway
from gateway.settings import GatewaySettings
from services.worker.server import Worker, start_worker
from services.worker.triton_process import BundledTriton
from tensorgate import GatewayClient, TensorgateClientError
from tests.conftest import worker_settings
from tests.helpers import metric_value, scrape


def _gateway_settings(*workers: str) -> GatewaySettings:
    # A long refresh interval: the gateway must learn of the failure from the call itself.
    return GatewaySettings(
        workers=workers,
        refresh_seconds=600,
        eject_seconds=60,
        metrics_port=0,
        drain_seconds=0,
        grace_seconds=1,
    )


async def test_unary_call_is_retried_on_another_worker(
    triton: BundledTriton, worker: Worker
) -> None:
    doomed = await start_worker(worker_settings(triton, models=("digits",)))
    gateway = await start_gateway(_gateway_settings(doomed.address, worker.address))
    try:
        await doomed.stop()  # the gateway still believes it serves
        async with GatewayClient(gateway.address) as client:
            outputs = await client.infer("digits", {"image": np.zeros((1, 64), np.float32)})
        assert outputs["label"].shape == (1, 1)
        assert gateway.service.metrics_endpoint is not None
        text = await scrape(f"http://127.0.0.1:{gateway.service.metrics_endpoint.port}/metrics")
        assert metric_value(text, "tensorgate_upstream_retries_total", method="Infer") == 1
        endpoint = next(w for w in gateway.pool._workers.values() if w.address == doomed.address)
        assert endpoint.ejected_until > time.monotonic()
    finally:
        await gateway.stop()


async def test_model_whose_only_worker_is_down_is_unavailable(triton: BundledTriton) -> None:
    doomed = await start_worker(worker_settings(triton, models=("digits",)))
    gateway = await start_gateway(_gateway_settings(doomed.address))
    try:
        await doomed.stop()
        async with GatewayClient(gateway.address) as client:
            with pytest.raises(TensorgateClientError) as error:
                await client.infer("digits", {"image": np.zeros((1, 64), np.float32)})
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
            assert "digits:1" in error.value.message
            with pytest.raises(TensorgateClientError) as error:
                async for _ in client.generate("tinylm", "Hi", max_tokens=2):
                    pass
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.stop()
