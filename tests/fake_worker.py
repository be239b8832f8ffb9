"""A bare InferenceWorker on a real gRPC server (port 0) whose behaviour a test sets:
it can hold calls until released, fail them as a lost transport would (UNAVAILABLE
with no request id) or as a broken worker would (its own status, with a request id),
or break a stream after its first chunk. Routing tests use it where a real Triton
cannot be made to misbehave on cue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorgate.errors import REQUEST_ID_KEY
from tensorgate.inference.v1 import inference_pb2
from tensorgate.worker.v1 import worker_pb2_grpc

from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings

Context = grpc.aio.ServicerContext[Any, Any]

MODELS = (
    inference_pb2.ModelInfo(name="digits", version=1, task="infer"),
    inference_pb2.ModelInfo(name="tinylm", version=1, task="generate"),
)


class FakeWorker(worker_pb2_grpc.InferenceWorkerServicer):
    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.address = ""
        self.calls = 0  # calls that reached a handler (Infer and Generate)
        self.in_flight = 0
        self.cancelled = 0  # calls the caller's cancel reached here
        self.deadlines: list[float | None] = []  # time left when each call arrived
        self.failing: grpc.StatusCode | None = None
        self.own_failure = False  # answer `failing` as the worker itself (with a request id)
        self.break_streams = False  # streams end UNAVAILABLE after their first chunk
        self.hold: asyncio.Event | None = None  # calls wait for it when set

    @classmethod
    async def start(cls) -> FakeWorker:
        fake = cls()
        worker_pb2_grpc.add_InferenceWorkerServicer_to_server(fake, fake.server)
        checks = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(checks, fake.server)
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        port = fake.server.add_insecure_port("127.0.0.1:0")
        fake.address = f"127.0.0.1:{port}"
        await fake.server.start()
        return fake

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        await self.server.stop(0)

    async def _arrive(self, context: Context) -> None:
        self.calls += 1
        self.deadlines.append(context.time_remaining())
        if self.failing is not None:
            if self.own_failure:
                context.set_trailing_metadata(((REQUEST_ID_KEY, f"fake-{self.calls}"),))
            await context.abort(self.failing, "the fake worker fails on purpose")

    async def _held(self) -> None:
        if self.hold is not None:
            await self.hold.wait()

    async def Infer(
        self, request: inference_pb2.InferRequest, context: Context
    ) -> inference_pb2.InferResponse:
        self.in_flight += 1
        try:
            await self._arrive(context)
            await self._held()
            return inference_pb2.InferResponse(model=request.model)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self.in_flight += 1
        try:
            await self._arrive(context)
            yield inference_pb2.GenerateChunk(text="a", token_ids=[1], model=request.model)
            if self.break_streams:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            await self._held()  # the stream stays open, holding its slot
            chunk = inference_pb2.GenerateChunk(text="b", token_ids=[2], model=request.model)
            chunk.finish_reason = inference_pb2.FinishReason.Value("FINISH_REASON_LENGTH")
            chunk.usage.prompt_tokens = 1
            chunk.usage.completion_tokens = 2
            yield chunk
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=MODELS)

    async def WatchModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> AsyncIterator[inference_pb2.ListModelsResponse]:
        yield inference_pb2.ListModelsResponse(models=MODELS)
        await asyncio.Event().wait()  # the list never changes; the stream stays open


async def routing_gateway(*workers: str, **overrides: object) -> Gateway:
    """A keyless gateway in front of `workers` for routing tests: no refresh timer to
    lean on (a test must see the gateway learn from calls), no drain on stop."""
    values: dict[str, object] = {
        "allow_anonymous": True,
        "workers": workers,
        "refresh_seconds": 600,
        "metrics_port": 0,
        "drain_seconds": 0,
        "grace_seconds": 1,
    }
    values.update(overrides)
    return await start_gateway(GatewaySettings(**values))  # type: ignore[arg-type]
