"""InferenceGateway: resolves the model, picks a worker, forwards, and passes results back.

Responses come back from the worker as bytes and go to the caller as they came:
the gateway never re-encodes what it only passes on. Infer responses are not even
decoded; each streamed chunk is parsed (cheap, in C) for its finish reason and
usage, and the bytes as received are what the caller gets.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from functools import lru_cache
from typing import Any

import grpc
import structlog
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef

from gateway.forwarding import RETRIED, Forwarder
from gateway.metrics import GatewayMetrics
from gateway.worker_pool import WorkerEndpoint, WorkerPool, hand_back
from services.runtime import calls
from services.runtime.api_keys import allows
from services.runtime.errors import Unavailable, UpstreamError

Context = grpc.aio.ServicerContext[Any, Any]

log = structlog.get_logger("tensorgate.gateway")

# Callers repeat the same few refs; parsing each once saves a regex per call.
parse_ref = lru_cache(maxsize=4096)(ModelRef.parse)

_parse_chunk = inference_pb2.GenerateChunk.FromString


class InferenceGatewayServicer(gateway_pb2_grpc.InferenceGatewayServicer):
    def __init__(
        self, pool: WorkerPool, metrics: GatewayMetrics, *, upstream_timeout: float
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._forward = Forwarder(pool, metrics, upstream_timeout=upstream_timeout)

    def _failed(
        self, worker: WorkerEndpoint, exc: grpc.aio.AioRpcError, model: str, chunks: int
    ) -> Exception:
        """What a stream's caller hears of a failed forward (Forwarder.failed), and that
        the worker was lost mid-stream when the transport failed after chunks went out."""
        error = self._forward.failed(worker, exc, model)
        if (
            chunks
            and not isinstance(error, UpstreamError)
            and exc.code() == grpc.StatusCode.UNAVAILABLE
        ):
            return Unavailable(
                f"the worker serving model {model} was lost after {chunks} chunk(s) of this "
                "stream; retry the call"
            )
        return error

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        ref = parse_ref(request.model)
        metadata = calls.outgoing_metadata()
        exclude: WorkerEndpoint | None = None
        # One retry on another worker, and only before the first chunk: after
        # that the caller has seen tokens and a retry would repeat or change them.
        for attempt in (1, 2):
            # A slot on the worker is taken here and held until the stream ends.
            worker, info, slots = await self._pool.route(ref, exclude=exclude)
            # The request is ours to change: forward it with the model resolved
            # rather than copying it (the caller's ref is already in the log line).
            request.model = resolved = f"{info.name}:{info.version}"
            calls.note(resolved=resolved, worker=worker.address)
            chunks = completion = 0
            finished = False
            try:
                call = worker.generate(request, timeout=self._forward.timeout(), metadata=metadata)
            except BaseException:
                slots.release(worker)
                raise
            try:
                async for raw in call:
                    if not chunks:
                        self._metrics.time_to_first_token.labels(info.name).observe(
                            time.perf_counter() - started
                        )
                    chunks += 1
                    chunk = _parse_chunk(raw)
                    # Counted before the yield: a caller that cancels while this
                    # generator waits at it has already read the chunk. A chunk in
                    # flight when the call is cut may be billed unread, never the reverse.
                    completion += len(chunk.token_ids)
                    if chunk.finish_reason:
                        finished = True
                        self._finished(info.name, chunk)
                    yield raw
                worker.answered()
                return
            except grpc.aio.AioRpcError as exc:
                error = self._failed(worker, exc, resolved, chunks)
                if attempt == 2 or chunks or exc.code() not in RETRIED:
                    raise error from exc
                log.warning("retrying on another worker", worker=worker.address)
                self._metrics.retries.labels("Generate").inc()
                exclude = worker
            finally:
                hand_back(worker, slots)
                if not call.done():
                    call.cancel()
                if chunks and not finished:
                    # Cut short (cancelled, a deadline, a lost worker): the tokens the
                    # caller got were made and are billed; the prompt at its bound.
                    calls.note_usage(len(request.prompt.encode()), completion)

    def _finished(self, model: str, chunk: inference_pb2.GenerateChunk) -> None:
        usage = chunk.usage
        self._metrics.completion_tokens.labels(model).inc(usage.completion_tokens)
        calls.note(finish_reason=inference_pb2.FinishReason.Name(chunk.finish_reason))
        calls.note_usage(usage.prompt_tokens, usage.completion_tokens)

    async def Infer(self, request: inference_pb2.InferRequest, context: Context) -> Any:
        metadata = calls.outgoing_metadata()

        def send(
            worker: WorkerEndpoint, info: inference_pb2.ModelInfo, timeout: float
        ) -> Awaitable[Any]:
            # Forwarded as it came, but for the version routed to: no copy of the tensors.
            # Bytes in, bytes out: the response's tensors are not decoded here.
            request.model = f"{info.name}:{info.version}"
            return worker.infer(request, timeout=timeout, metadata=metadata)

        return await self._forward.unary(parse_ref(request.model), "Infer", send)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        models = self._pool.models()
        principal = calls.principal()
        if principal is not None:
            # A key sees the models it may call, not every team's.
            models = [m for m in models if allows(principal, m.name)]
        return inference_pb2.ListModelsResponse(models=models)
