"""A rollout across two workers, one slow to load the new version, under Infer load.

The gateway keeps an alias's traffic on the old version until the new one is loaded on
every worker that serves the old one. So the worker that loaded the new version first
must keep the old one while the slow one catches up: it lets go of a replaced version
only once calls for it have stopped, not on a timer that the slow worker can outlast.
No request fails, and every response names the version that served it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorgate import from_tensor, to_tensor
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.registry_client import AsyncRegistryClient
from tensorgate.worker.v1 import worker_pb2_grpc

from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings
from services.registry.server import Registry, start_registry
from services.registry.settings import RegistrySettings
from services.worker.server import Worker, start_worker
from services.worker.settings import WorkerSettings

RETIRE_SECONDS = 0.5
# How long the slow worker's Triton takes to load version 2: far longer than
# RETIRE_SECONDS, so a timer-based retirement would drop version 1 meanwhile.
SLOW_LOAD_SECONDS = 8
CONFIG = """
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
parameters { key: "task" value: { string_value: "infer" } }
"""
# numpy only; version 2 is slow to load on the worker whose data dir says "slow".
MODEL = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        if {slow} and "slow" in args["model_repository"]:
            time.sleep({seconds})

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = (x * {factor}).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
"""


@dataclass
class Stack:
    registry: Registry
    fast: Worker
    slow: Worker
    gateway: Gateway
    client: AsyncRegistryClient


def _folder(root: Path, factor: int) -> Path:
    folder = root / f"scale{factor}"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    slow = factor == 2
    text = MODEL.format(slow=slow, seconds=SLOW_LOAD_SECONDS, factor=factor)
    (folder / "1" / "model.py").write_text(text)
    return folder


def _worker(registry: Registry, data_dir: Path) -> WorkerSettings:
    return WorkerSettings(
        registry=registry.address,
        data_dir=data_dir,
        metrics_port=0,
        drain_seconds=0.0,
        grace_seconds=1.0,
        retire_seconds=RETIRE_SECONDS,
    )


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    registry = await start_registry(
        RegistrySettings(data_dir=tmp_path / "registry", metrics_port=0, drain_seconds=0.0)
    )
    client = AsyncRegistryClient(registry.address, actor="test")
    started: list[Worker | Gateway] = []
    try:
        await client.create_model("scale", task="infer")
        for factor in (1, 2):
            await client.upload("scale", _folder(tmp_path / "folders", factor))
        await client.set_alias("scale", "production", 1)
        await client.set_deployment("scale", alias="production")
        fast, slow = await asyncio.gather(
            start_worker(_worker(registry, tmp_path / "fast")),
            start_worker(_worker(registry, tmp_path / "slow")),
        )
        started += [fast, slow]
        gateway = await start_gateway(
            GatewaySettings(
                allow_anonymous=True,
                workers=(fast.address, slow.address),
                registry=registry.address,
                metrics_port=0,
                drain_seconds=0.0,
                grace_seconds=1.0,
            )
        )
        started.append(gateway)
        yield Stack(registry, fast, slow, gateway, client)
    finally:
        for service in reversed(started):
            await service.stop()
        await client.close()
        await registry.stop()


async def _listed(worker: Worker) -> list[str]:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        listing = await worker_pb2_grpc.InferenceWorkerStub(channel).ListModels(
            inference_pb2.ListModelsRequest()
        )
    return [f"{m.name}:{m.version}" for m in listing.models]


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_rollout_waits_for_the_slow_worker_and_fails_no_request(stack: Stack) -> None:
    served: dict[str, int] = {}
    failures: list[str] = []
    stop = asyncio.Event()
    request = inference_pb2.InferRequest(
        model="scale@production",
        inputs=[to_tensor("x", np.array([1.0, 2.0], dtype=np.float32))],
    )

    async def caller(stub: gateway_pb2_grpc.InferenceGatewayAsyncStub) -> None:
        while not stop.is_set():
            try:
                response = await stub.Infer(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            factor = {"scale:1": 1.0, "scale:2": 2.0}[response.model]
            assert [float(v) for v in from_tensor(response.outputs[0])] == [factor, 2 * factor]
            served[response.model] = served.get(response.model, 0) + 1

    async def both_serve_v1() -> bool:
        lists = [await _listed(w) for w in (stack.fast, stack.slow)]
        return all("scale:1" in listed for listed in lists)

    await _until(both_serve_v1)
    async with grpc.aio.insecure_channel(stack.gateway.address) as channel:
        stub: gateway_pb2_grpc.InferenceGatewayAsyncStub = gateway_pb2_grpc.InferenceGatewayStub(
            channel
        )
        callers = [asyncio.create_task(caller(stub)) for _ in range(4)]
        try:
            await _until(lambda: _has(served, "scale:1"))
            await stack.client.set_alias("scale", "production", 2, expected_version=1)

            async def fast_has_v2() -> bool:
                return "scale:2" in await _listed(stack.fast)

            await _until(fast_has_v2)
            # Well past RETIRE_SECONDS, with the slow worker still loading: the fast one
            # keeps version 1, which is where the gateway still sends production.
            await asyncio.sleep(RETIRE_SECONDS * 4)
            assert "scale:2" not in await _listed(stack.slow)
            assert await _listed(stack.fast) == ["scale:1", "scale:2"]

            # Once the slow worker has version 2, traffic moves and version 1 goes.
            async def v1_gone() -> bool:
                lists = [await _listed(w) for w in (stack.fast, stack.slow)]
                return all(listed == ["scale:2"] for listed in lists)

            await _until(lambda: _has(served, "scale:2"))
            await _until(v1_gone)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert failures == [], failures[:10]
    assert set(served) == {"scale:1", "scale:2"}


async def _has(served: dict[str, int], label: str) -> bool:
    return served.get(label, 0) >= 5
