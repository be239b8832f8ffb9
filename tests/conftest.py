"""Shared fixtures: one real bundled Triton per session, with a real worker and gateway
on port 0 in front of it (in this process, on the session's event loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tensorgate import AsyncGatewayClient

from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings
from services.runtime.logging import configure_logging
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings
from services.worker.triton_process import BundledTriton

REPO = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO / "models" / "repository"

configure_logging(level="info", fmt="json")


@pytest.fixture(scope="session")
async def triton(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BundledTriton]:
    bundled = BundledTriton(MODEL_REPOSITORY, tmp_path_factory.mktemp("triton"))
    await bundled.start(timeout=120)
    yield bundled
    await bundled.stop()


def worker_settings(triton: BundledTriton, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "triton_url": triton.grpc_url,
        "metrics_port": 0,
        "models": ("tinylm", "digits"),
        "drain_seconds": 0.0,
        "grace_seconds": 2.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def worker(triton: BundledTriton) -> AsyncIterator[Worker]:
    running = await start_worker(worker_settings(triton))
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def gateway(worker: Worker) -> AsyncIterator[Gateway]:
    running = await start_gateway(
        GatewaySettings(
            workers=(worker.address,), metrics_port=0, drain_seconds=0.0, grace_seconds=2.0
        )
    )
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def client(gateway: Gateway) -> AsyncIterator[AsyncGatewayClient]:
    async with AsyncGatewayClient(gateway.address) as connected:
        yield connected
