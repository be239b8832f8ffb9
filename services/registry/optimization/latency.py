"""Latency of a model version through the real serving path: the worker's gRPC API, the
worker's checks, Triton and the model's own code, as the gateway would call it.

Each figure is p50/p99 over `calls` calls, at concurrency 1 (one after another) and 8
(eight callers at once), after a few warm-up calls. "infer" models get one row of
zeros of each input (a valid digits image: a blank one); "generate" models a short
greedy generation, timed to its last chunk.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from tensorgate.inference.v1 import inference_pb2
from tensorgate.registry.v1 import registry_pb2 as pb
from tensorgate.tensors import NUMPY_TYPES
from tensorgate.worker.v1 import worker_pb2_grpc

from services.runtime.readiness import poll_until

CONCURRENCIES = (1, 8)
WARM_UP_CALLS = 3
PROMPT = "ROMEO:"
GENERATE_TOKENS = 16
CALL_TIMEOUT_S = 60.0

Request = inference_pb2.InferRequest | inference_pb2.GenerateRequest


def _infer_request(version: pb.ModelVersion) -> inference_pb2.InferRequest:
    config = version.config
    inputs = []
    for spec in config.inputs:
        if spec.optional:
            continue
        shape = [1 if dim < 0 else dim for dim in spec.shape]
        if config.max_batch_size > 0:
            shape = [1, *shape]
        zeros = np.zeros(shape, dtype=NUMPY_TYPES[spec.datatype])
        inputs.append(
            inference_pb2.Tensor(
                name=spec.name, datatype=spec.datatype, shape=shape, raw_contents=zeros.tobytes()
            )
        )
    return inference_pb2.InferRequest(model=f"{version.model}:{version.version}", inputs=inputs)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples), q))


class LatencyProbe:
    """Calls one worker's InferenceWorker service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = worker_pb2_grpc.InferenceWorkerStub(channel)

    async def wait_loaded(self, versions: list[pb.ModelVersion], timeout: float) -> None:
        wanted = {(v.model, v.version) for v in versions}

        async def loaded() -> bool | None:
            listing = await self._stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5.0)
            return True if wanted <= {(m.name, m.version) for m in listing.models} else None

        named = ", ".join(f"{m}:{v}" for m, v in sorted(wanted))
        await poll_until(
            loaded,
            timeout=timeout,
            interval=0.2,
            what=f"the worker to load {named}",
            expected=(grpc.aio.AioRpcError,),
        )

    async def _one(self, request: Request) -> float:
        started = time.perf_counter()
        if isinstance(request, inference_pb2.GenerateRequest):
            async for _ in self._stub.Generate(request, timeout=CALL_TIMEOUT_S):
                pass
        else:
            await self._stub.Infer(request, timeout=CALL_TIMEOUT_S)
        return (time.perf_counter() - started) * 1000.0

    async def _timed(self, request: Request, calls: int, concurrency: int) -> list[float]:
        """`calls` call times (ms), taken by `concurrency` callers at once."""
        samples: list[float] = []
        remaining = calls

        async def caller() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                samples.append(await self._one(request))

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return samples

    def _request(self, version: pb.ModelVersion) -> Request:
        if version.config.parameters.get("task") == "generate" or version.config.decoupled:
            return inference_pb2.GenerateRequest(
                model=f"{version.model}:{version.version}",
                prompt=PROMPT,
                max_tokens=GENERATE_TOKENS,
                temperature=0.0,
                seed=0,
            )
        return _infer_request(version)

    async def warm_up(self, versions: list[pb.ModelVersion]) -> None:
        """A few calls each first: a model's first calls pay for lazy set-up."""
        for version in versions:
            for _ in range(WARM_UP_CALLS):
                await self._one(self._request(version))

    async def measure(
        self, version: pb.ModelVersion, calls: int, concurrency: int
    ) -> dict[str, float]:
        """{"latency_c<concurrency>_p50_ms": ..., "latency_c<concurrency>_p99_ms": ...}."""
        samples = await self._timed(self._request(version), calls, concurrency)
        return {
            f"latency_c{concurrency}_p50_ms": percentile(samples, 50),
            f"latency_c{concurrency}_p99_ms": percentile(samples, 99),
        }
