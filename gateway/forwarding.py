"""How the gateway forwards a call to a worker, for both of its front doors (the
platform's InferenceGateway and KServe's GRPCInferenceService): the upstream deadline,
what a failure tells the caller and counts against the worker, and a unary call retried
once on another worker when the first could not take it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import structlog
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef

from gateway.metrics import GatewayMetrics
from gateway.worker_pool import WorkerEndpoint, WorkerPool, hand_back
from services.runtime import calls
from services.runtime.errors import UpstreamError, upstream_error

log = structlog.get_logger("tensorgate.gateway")

# What a worker answers when the call never ran there, so another worker may take it:
# UNAVAILABLE (it could not be reached, or is going away) and NOT_FOUND (it let go of the
# version a moment before this gateway heard: the retirement raced the routing).
RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND})

T = TypeVar("T")
# Sends the call to `worker` for the version `info` routed to, within `timeout` seconds.
Send = Callable[[WorkerEndpoint, inference_pb2.ModelInfo, float], Awaitable[T]]


class Forwarder:
    """Forwards calls to the workers of one pool."""

    def __init__(
        self, pool: WorkerPool, metrics: GatewayMetrics, *, upstream_timeout: float
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._upstream_timeout = upstream_timeout

    def timeout(self) -> float:
        """The caller's time left, or the gateway's upstream timeout when it set none."""
        remaining = calls.remaining()
        return self._upstream_timeout if remaining is None else remaining

    def failed(self, worker: WorkerEndpoint, exc: grpc.aio.AioRpcError, model: str) -> Exception:
        """What the caller hears of a failed forward; the pool counts it against the worker
        (the worker's own answer carries its request id; anything else is the transport)."""
        error = upstream_error(exc, f"model {model}")
        self._pool.failed(worker, exc.code(), own=isinstance(error, UpstreamError))
        return error

    async def unary(self, ref: ModelRef, method: str, send: Send[T]) -> T:
        """A unary call on a worker that has `ref`, retried once on another when the
        first could not take it (`method` names it in the retries metric)."""
        exclude: WorkerEndpoint | None = None
        for attempt in (1, 2):
            worker, info, slots = await self._pool.route(ref, exclude=exclude)
            resolved = f"{info.name}:{info.version}"
            calls.note(resolved=resolved, worker=worker.address)
            try:
                response = await send(worker, info, self.timeout())
            except grpc.aio.AioRpcError as exc:
                error = self.failed(worker, exc, resolved)
                if attempt == 2 or exc.code() not in RETRIED:
                    raise error from exc
            else:
                worker.answered()
                return response
            finally:
                hand_back(worker, slots)
            log.warning("retrying on another worker", worker=worker.address)
            self._metrics.retries.labels(method).inc()
            exclude = worker
        raise AssertionError("unreachable")
