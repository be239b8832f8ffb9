"""The gateway routes around a worker that went away: retry once, eject, or UNAVAILABLE."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorgate import AsyncGatewayClient, TensorgateClientError

from gateway.server import start_gateway
from gateway.settings import GatewaySettings
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings
from services.worker.triton_process import BundledTriton
from tests.conftest import worker_settings
from tests.helpers import metric_value, scrape


def _gateway_settings(*workers: str) -> GatewaySettings:
    # A long refresh interval: the gateway must learn of the failure from the call itself.
    return GatewaySettings(
        allow_anonymous=True,
        workers=workers,
        refresh_seconds=600,
        eject_seconds=60,
        metrics_port=0,
        drain_seconds=0,
        grace_seconds=1,
    )


async def test_unary_call_is_retried_on_another_worker(worker: Worker, tmp_path: Path) -> None:
    # A worker that answers but whose Triton is gone: it says UNAVAILABLE itself.
    doomed = await start_worker(
        WorkerSettings(models=("digits",), data_dir=tmp_path, metrics_port=0, drain_seconds=0)
    )
    gateway = await start_gateway(_gateway_settings(doomed.address, worker.address))
    try:
        assert doomed.bundled is not None and doomed.bundled.pid is not None
        os.kill(doomed.bundled.pid, signal.SIGKILL)
        await doomed.bundled.wait_exited()
        async with AsyncGatewayClient(gateway.address) as client:
            outputs = await client.infer("digits", {"image": np.zeros((1, 64), np.float32)})
        assert outputs["label"].shape == (1, 1)
        assert gateway.service.metrics_endpoint is not None
        text = await scrape(f"http://127.0.0.1:{gateway.service.metrics_endpoint.port}/metrics")
        assert metric_value(text, "tensorgate_upstream_retries_total", method="Infer") == 1
        # The worker answered (with its own status): it is not ejected, only skipped once.
        endpoint = next(w for w in gateway.pool._workers.values() if w.address == doomed.address)
        assert endpoint.ejected_until == 0.0
    finally:
        await gateway.stop()
        await doomed.stop()


async def test_model_whose_only_worker_is_down_is_unavailable(triton: BundledTriton) -> None:
    doomed = await start_worker(worker_settings(triton, models=("digits",)))
    gateway = await start_gateway(_gateway_settings(doomed.address))
    try:
        await doomed.stop()
        async with AsyncGatewayClient(gateway.address) as client:
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


async def test_a_draining_worker_gets_no_new_calls(triton: BundledTriton) -> None:
    draining = await start_worker(worker_settings(triton, models=("digits",), drain_seconds=3.0))
    gateway = await start_gateway(_gateway_settings(draining.address))
    try:
        stopping = asyncio.create_task(draining.stop())
        await asyncio.sleep(0.5)  # inside the drain: the worker still answers, but says NOT_SERVING
        async with AsyncGatewayClient(gateway.address) as client:
            with pytest.raises(TensorgateClientError) as error:
                await client.infer("digits", {"image": np.zeros((1, 64), np.float32)})
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        await stopping
    finally:
        await gateway.stop()
