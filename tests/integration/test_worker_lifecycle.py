"""A worker notices its bundled Triton's death, and a given Triton that lost its models
(restarted); a failed start leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from tritonclient.grpc.aio import InferenceServerClient

from services.worker.server import start_worker
from services.worker.settings import WorkerSettings
from services.worker.triton_process import BundledTriton
from tests.conftest import MODEL_REPOSITORY
from tests.helpers import health_status, process_alive, process_command


async def test_worker_reports_failure_when_its_triton_dies(tmp_path: Path) -> None:
    worker = await start_worker(
        WorkerSettings(
            models=("digits",),
            data_dir=tmp_path,
            metrics_port=0,
            drain_seconds=0,
            grace_seconds=1,
        )
    )
    try:
        assert worker.bundled is not None
        pid = worker.bundled.pid
        assert pid is not None and await health_status(worker.address) == "SERVING"
        os.kill(pid, signal.SIGKILL)
        reason = await asyncio.wait_for(worker.wait_failed(), timeout=30)
        assert "bundled Triton exited with code -9" in reason
        assert await health_status(worker.address) == "NOT_SERVING"
    finally:
        await worker.stop()


async def test_a_model_that_cannot_load_stops_the_start_cleanly(tmp_path: Path) -> None:
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    with pytest.raises(RuntimeError, match="could not load nosuchmodel"):
        await start_worker(
            WorkerSettings(models=("nosuchmodel",), data_dir=tmp_path, metrics_port=0)
        )
    started = {int(p) for p in os.listdir("/proc") if p.isdigit()} - {int(p) for p in before}
    leftovers = [process_command(pid) for pid in started if process_alive(pid)]
    # Only this test's Triton and stubs: their command lines name its data dir.
    leftovers = [command for command in leftovers if str(tmp_path) in command]
    assert not leftovers


async def test_a_worker_fails_when_the_triton_it_was_given_loses_its_models(
    tmp_path: Path,
) -> None:
    # A Triton the worker did not start (a pod's sidecar) that restarts comes back with
    # nothing loaded: the worker must not go on advertising models it cannot serve.
    triton = BundledTriton(MODEL_REPOSITORY, tmp_path / "triton")
    await triton.start(120)
    try:
        worker = await start_worker(
            WorkerSettings(
                models=("digits",),
                triton_url=triton.grpc_url,
                data_dir=tmp_path / "worker",
                metrics_port=0,
                drain_seconds=0,
                grace_seconds=1,
            )
        )
        try:
            failed = asyncio.ensure_future(worker.wait_failed())
            done, _ = await asyncio.wait({failed}, timeout=5)
            assert not done, "the worker failed while its Triton had every model"
            async with InferenceServerClient(triton.grpc_url) as control:
                await control.unload_model("digits")
            reason = await asyncio.wait_for(failed, timeout=30)
            assert "no longer has digits:1 loaded" in reason
            assert await health_status(worker.address) == "NOT_SERVING"
        finally:
            await worker.stop()
    finally:
        await triton.stop()
