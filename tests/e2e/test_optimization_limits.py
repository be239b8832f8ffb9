"""Optimization jobs against a registry whose worker never answers: what a caller can make
the registry hold (jobs pending), with no Triton needed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tensorgate.errors import ResourceExhaustedError
from tensorgate.registry_client import AsyncRegistryClient

from launcher.demo_models import register_demo_model
from services.registry.optimization.runner import MAX_PENDING
from services.registry.server import start_registry
from services.registry.settings import RegistrySettings
from services.runtime.process import lasting_port

REPO = Path(__file__).resolve().parents[2]


async def test_concurrent_starts_cannot_queue_more_than_the_bound(tmp_path: Path) -> None:
    # The first job waits for a worker that never loads anything; the others queue behind.
    registry = await start_registry(
        RegistrySettings(
            data_dir=tmp_path,
            metrics_port=0,
            drain_seconds=0.0,
            workers=(f"127.0.0.1:{lasting_port()}",),
            load_timeout_seconds=60.0,
        )
    )
    try:
        async with AsyncRegistryClient(registry.address) as client:
            await register_demo_model(client, REPO / "models" / "repository" / "digits")
            started = await asyncio.gather(
                *(
                    client.start_optimization("digits:1", [("int8-dynamic", {})])
                    for _ in range(MAX_PENDING + 8)
                ),
                return_exceptions=True,
            )
            refused = [r for r in started if isinstance(r, ResourceExhaustedError)]
            assert len(refused) == 8, [r for r in started if isinstance(r, BaseException)]
            assert "16 optimization jobs queued or running" in str(refused[0])
            assert len(await client.list_optimization_jobs("digits")) == MAX_PENDING
    finally:
        await registry.stop()
