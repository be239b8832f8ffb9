"""InferenceGateway: resolves the model, picks a worker, forwards, and passes results back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from tensorgate.errors import metadata_value
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef

from gateway.metrics import GatewayMetrics
from gateway.worker_pool import WorkerEndpoint, WorkerPool
from services.runtime.errors import Cancelled, DeadlineExceeded, Unavailable, UpstreamError
from services.runtime.interceptors import REQUEST_ID_KEY, current_request_id

Context = grpc.aio.ServicerContext[Any, Any]


class WorkerFailure(RuntimeError):
    """A worker broke a call in a way no status explains (logged; INTERNAL to the caller)."""


log = structlog.get_logger("tensorgate.gateway")


class InferenceGatewayServicer(gateway_pb2_grpc.InferenceGatewayServicer):
    def __init__(
        self, pool: WorkerPool, metrics: GatewayMetrics, *, upstream_timeout: float
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._upstream_timeout = upstream_timeout

    def _timeout(self, context: Context) -> float:
        remaining = context.time_remaining()
        return self._upstream_timeout if remaining is None else remaining

    def _failed(self, worker: WorkerEndpoint, exc: grpc.aio.AioRpcError, model: str) -> Exception:
        """What the caller hears of a failed forward; a worker that cannot be reached is ejected.

        A status the worker chose carries its request id trailer and is passed on as
        it came. Anything else came from the transport: it is told in our words, so
        worker addresses and gRPC internals stay out of the caller's view.
        """
        if metadata_value(exc.trailing_metadata(), REQUEST_ID_KEY) is not None:
            return UpstreamError(exc)
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            worker.eject(self._pool.eject_seconds)
            return Unavailable(f"model {model} is unavailable: its worker cannot be reached")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"deadline passed while {model} was running")
        if code == grpc.StatusCode.CANCELLED:
            return Cancelled(f"the call to {model} was cancelled")
        return WorkerFailure(
            f"worker {worker.address} failed on {model}: {code.name} {exc.details()}"
        )

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        started = time.perf_counter()
        ref = ModelRef.parse(request.model)
        metadata = ((REQUEST_ID_KEY, current_request_id.get()),)
        exclude: WorkerEndpoint | None = None
        # One retry on another worker, and only before the first chunk: after
        # that the caller has seen tokens and a retry would repeat or change them.
        for attempt in (1, 2):
            worker, info = await self._pool.route(ref, exclude=exclude)
            # The request is ours to change: forward it with the model resolved
            # rather than copying it (the caller's ref is already in the log context).
            request.model = f"{info.name}:{info.version}"
            structlog.contextvars.bind_contextvars(resolved=request.model, worker=worker.address)
            chunks = 0
            with worker.track():
                call = worker.stub.Generate(
                    request, timeout=self._timeout(context), metadata=metadata
                )
                try:
                    async for chunk in call:
                        if not chunks:
                            self._metrics.time_to_first_token.labels(info.name).observe(
                                time.perf_counter() - started
                            )
                        chunks += 1
                        if chunk.finish_reason:
                            self._metrics.completion_tokens.labels(info.name).inc(
                                chunk.usage.completion_tokens
                            )
                            structlog.contextvars.bind_contextvars(
                                finish_reason=inference_pb2.FinishReason.Name(chunk.finish_reason),
                                prompt_tokens=chunk.usage.prompt_tokens,
                                completion_tokens=chunk.usage.completion_tokens,
                            )
                        yield chunk
                    return
                except grpc.aio.AioRpcError as exc:
                    error = self._failed(worker, exc, request.model)
                    if attempt == 2 or chunks or exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise error from exc
                    log.warning("retrying on another worker", worker=worker.address)
                    self._metrics.retries.labels("Generate").inc()
                    exclude = worker
                finally:
                    if not call.done():
                        call.cancel()

    async def Infer(
        self, request: inference_pb2.InferRequest, context: Context
    ) -> inference_pb2.InferResponse:
        ref = ModelRef.parse(request.model)
        metadata = ((REQUEST_ID_KEY, current_request_id.get()),)
        worker, info = await self._pool.route(ref)
        resolved = f"{info.name}:{info.version}"
        request.model = resolved  # forwarded as it came otherwise: no copy of the tensors
        structlog.contextvars.bind_contextvars(resolved=resolved)
        for attempt in (1, 2):
            structlog.contextvars.bind_contextvars(worker=worker.address)
            with worker.track():
                try:
                    response: inference_pb2.InferResponse = await worker.stub.Infer(
                        request, timeout=self._timeout(context), metadata=metadata
                    )
                    return response
                except grpc.aio.AioRpcError as exc:
                    error = self._failed(worker, exc, resolved)
                    if attempt == 2 or exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise error from exc
            log.warning("retrying on another worker", worker=worker.address)
            self._metrics.retries.labels("Infer").inc()
            worker, _ = await self._pool.route(ref, exclude=worker)
        raise AssertionError("unreachable")

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=self._pool.models())
