"""Optimization jobs against a registry whose worker never answers: what a caller can make
the registry hold (jobs pending), with no Triton needed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tensorgate.errors import ResourceExhaustedError
from tensorgate.registry_client import AsyncRegistryClient

from launcher.demo_models import register_demo_model
from services.registry.optimization.runner import MAX_PENDING
from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings
from services.runtime.process import lasting_port

REPO = Path(__file__).resolve().parents[2]


async def registry_with_a_silent_worker(data_dir: Path, *, load_timeout_s: float) -> Registry:
    """A registry whose worker never answers (nothing listens at its address), with
    digits:1 registered: a job derives its version, then waits `load_timeout_s` for a
    load that never comes."""
    registry = await start_registry(
        RegistrySettings(
            data_dir=data_dir,
            metrics_port=0,
            drain_seconds=0.0,
            workers=(f"127.0.0.1:{lasting_port()}",),
            load_timeout_seconds=load_timeout_s,
        )
    )
    try:
        async with AsyncRegistryClient(registry.address) as client:
            await register_demo_model(client, REPO / "models" / "repository" / "digits")
    except BaseException:
        await registry.stop()
        raise
    return registry


async def test_concurrent_starts_cannot_queue_more_than_the_bound(tmp_path: Path) -> None:
    # The first job waits for a worker that never loads anything; the others queue behind.
    registry = await registry_with_a_silent_worker(tmp_path, load_timeout_s=60.0)
    try:
        async with AsyncRegistryClient(registry.address) as client:
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
