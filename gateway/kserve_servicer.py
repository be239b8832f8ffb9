"""The KServe v2 front door: `inference.GRPCInferenceService` as Triton serves it, so
tritonclient and perf_analyzer work unchanged, with an API key as a header.

Every call runs in the same pipeline as Generate and Infer (request id, key, quota,
error mapping, the canonical log line, metrics). A call names its model the KServe way;
`model_name` may carry an alias (`digits@production`) and `model_version` picks a
version as in Triton (services/runtime/kserve.py). The gateway routes as for Infer and
Generate, asks the worker's passthrough (services/worker/kserve_servicer.py), and passes
the answer on as bytes: tensors are never decoded here. ModelInfer is retried once on
another worker when the first could not take it; a stream is not retried.

The server-level calls are the gateway's own: live while it runs, ready while some
worker serves. Repository and shared-memory calls are refused (RefusedCalls).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeAlias

import grpc
import structlog
from tensorgate.model_ref import ModelRef
from tritonclient.grpc import service_pb2

from gateway.authentication import check_model_scope
from gateway.forwarding import Forwarder
from gateway.kserve_quota import StreamMeter, note_model
from gateway.kserve_statistics import merged
from gateway.kserve_upstream import KServeUpstreams
from gateway.metrics import GatewayMetrics
from gateway.quota import QuotaGate
from gateway.worker_pool import WorkerEndpoint, WorkerPool, hand_back
from services.runtime import calls
from services.runtime.api_keys import allows
from services.runtime.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.runtime.kserve import RefusedCalls, model_ref

Context = grpc.aio.ServicerContext[Any, Any]
Request: TypeAlias = service_pb2.ModelInferRequest

log = structlog.get_logger("tensorgate.gateway.kserve")

parse_ref = lru_cache(maxsize=4096)(ModelRef.parse)
_parse_stream_response = service_pb2.ModelStreamInferResponse.FromString
# What the gateway offers of the KServe extensions.
_EXTENSIONS = ("model_configuration", "statistics", "parameters")


def _server_version() -> str:
    try:
        return version("tensorgate-platform")
    except PackageNotFoundError:
        return "unknown"


class KServeGatewayServicer(RefusedCalls):
    def __init__(
        self,
        pool: WorkerPool,
        metrics: GatewayMetrics,
        *,
        upstream_timeout: float,
        quota: QuotaGate | None = None,
    ) -> None:
        """`quota` meters ModelStreamInfer's requests as they arrive (the quota stage meters
        the unary calls in the pipeline)."""
        self._pool = pool
        self._metrics = metrics
        self._forward = Forwarder(pool, metrics, upstream_timeout=upstream_timeout)
        self._quota = quota
        self._upstreams = KServeUpstreams()
        self._metadata = service_pb2.ServerMetadataResponse(
            name="tensorgate", version=_server_version(), extensions=_EXTENSIONS
        )

    # -- the gateway's own answers ------------------------------------------------

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: Context
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: Context
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=bool(self._pool.serving_workers()))

    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: Context
    ) -> service_pb2.ServerMetadataResponse:
        return self._metadata

    # -- helpers ------------------------------------------------------------------

    @staticmethod
    def _ref(name: str, version: str, field: str, *, check_scope: bool = True) -> ModelRef:
        """The model a call names, after the key's scope is checked (`check_scope` False:
        the quota stage checked it already, as it does for ModelInfer)."""
        note_model(name)
        text = model_ref(name, version, field)
        principal = calls.principal()
        if check_scope and principal is not None:
            check_model_scope(principal, text)  # PERMISSION_DENIED names the model
        return parse_ref(text)

    async def _unary(self, ref: ModelRef, method: str, make: Any) -> Any:
        """A unary call (`method` of the worker's passthrough) on a worker that has
        `ref` (Forwarder.unary); `make(info)` is the request for the version routed."""

        def send(worker: WorkerEndpoint, info: Any, timeout: float) -> Any:
            call = getattr(self._upstreams.of(worker), method)
            return call(make(info), timeout=timeout, metadata=calls.outgoing_metadata())

        return await self._forward.unary(ref, method, send)

    # -- models -------------------------------------------------------------------

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Context
    ) -> service_pb2.ModelReadyResponse:
        ref = self._ref(request.name, request.version, "name")
        try:
            worker, _, slots = await self._pool.route(ref)
        except (NotFound, Unavailable):
            return service_pb2.ModelReadyResponse(ready=False)
        hand_back(worker, slots)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Context
    ) -> Any:
        ref = self._ref(request.name, request.version, "name")
        return await self._unary(
            ref,
            "metadata",
            lambda info: service_pb2.ModelMetadataRequest(
                name=info.name, version=str(info.version)
            ),
        )

    async def ModelConfig(self, request: service_pb2.ModelConfigRequest, context: Context) -> Any:
        ref = self._ref(request.name, request.version, "name")
        return await self._unary(
            ref,
            "config",
            lambda info: service_pb2.ModelConfigRequest(name=info.name, version=str(info.version)),
        )

    async def ModelStatistics(
        self, request: service_pb2.ModelStatisticsRequest, context: Context
    ) -> service_pb2.ModelStatisticsResponse:
        """A model version's statistics (with no name, every model's the key may call),
        added up over the workers serving it (gateway/kserve_statistics.py)."""
        asked = service_pb2.ModelStatisticsRequest()
        if request.name:
            ref = self._ref(request.name, request.version, "name")
            worker, info, slots = await self._pool.route(ref)  # the version `ref` means
            hand_back(worker, slots)
            calls.note(resolved=f"{info.name}:{info.version}")
            asked.name, asked.version = info.name, str(info.version)
            workers = self._pool.serving_workers(info.name, info.version) or [worker]
        elif request.version:
            raise InvalidArgument("version", "needs a model name")
        else:
            workers = self._pool.serving_workers()
        answers = await asyncio.gather(
            *(
                self._upstreams.of(w).statistics(
                    asked, timeout=self._forward.timeout(), metadata=calls.outgoing_metadata()
                )
                for w in workers
            ),
            return_exceptions=True,
        )
        read = []
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError):
                # One worker's figures missing is better than none; said in the log.
                log.warning("statistics not read", worker=worker.address, error=answer.code().name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                read.append(answer)
        if not read and workers:
            raise Unavailable("no worker could be asked for statistics right now; retry shortly")
        total = merged(read)
        principal = calls.principal()
        if principal is not None and not request.name:
            # A key sees the models it may call, not every team's.
            allowed = [s for s in total.model_stats if allows(principal, s.name)]
            del total.model_stats[:]
            total.model_stats.extend(allowed)
        return total

    # -- inference ----------------------------------------------------------------

    async def ModelInfer(self, request: Request, context: Context) -> Any:
        ref = self._ref(
            request.model_name,
            request.model_version,
            "model_name",
            check_scope=self._quota is None,  # else the quota stage had it checked
        )

        def routed(info: Any) -> Request:
            # The request is ours to change: forwarded renamed, its tensors not copied.
            request.model_name, request.model_version = info.name, str(info.version)
            return request

        return await self._unary(ref, "infer", routed)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Request], context: Context
    ) -> AsyncIterator[Any]:
        """One model per stream, the one its first request names (the worker behind was
        chosen for it); each request is metered as it comes (gateway/kserve_quota.py),
        and takes a slot on the worker while it is in flight (_RequestSlots)."""
        started = time.perf_counter()
        requests = aiter(requests)
        first = await anext(requests, None)
        if first is None:
            return
        asked = (first.model_name, first.model_version)
        ref = self._ref(*asked, "model_name")
        meter = StreamMeter(self._quota, calls.current())
        try:
            await meter.reserve(first, str(ref))
            worker, info, slots = await self._pool.route(ref)
            resolved = f"{info.name}:{info.version}"
            calls.note(resolved=resolved, worker=worker.address)
            routed = (info.name, str(info.version))
            # No request iterator: the pump writes the requests itself.
            upstream = self._upstreams.of(worker).stream(  # type: ignore[call-arg]
                timeout=self._forward.timeout(), metadata=calls.outgoing_metadata()
            )
            refusal: list[Exception] = []
            held = _RequestSlots(slots, worker, resolved)
            pump = asyncio.ensure_future(
                _pump(first, requests, asked, routed, str(ref), meter, held, upstream, refusal)
            )
            responses = 0
            try:
                async for raw in upstream:
                    if not responses:
                        self._metrics.time_to_first_token.labels(info.name).observe(
                            time.perf_counter() - started
                        )
                    responses += 1
                    if await meter.responded(_parse_stream_response(raw)):
                        held.finished()
                    yield raw
                worker.answered()
            except grpc.aio.AioRpcError as exc:
                if refusal:
                    raise refusal[0] from None
                raise self._forward.failed(worker, exc, resolved) from exc
            finally:
                pump.cancel()
                held.release()
                hand_back(worker, slots)
                if not upstream.done():
                    upstream.cancel()  # the caller went away: so do its requests in Triton
            if refusal:
                raise refusal[0]
        finally:
            await meter.release()
            if meter.completion_tokens:
                self._metrics.completion_tokens.labels(ref.name).inc(meter.completion_tokens)
            calls.note(prompt_tokens=meter.prompt_tokens, completion_tokens=meter.completion_tokens)


class _RequestSlots:
    """The worker's slots for a stream's requests beyond its first (which holds the one
    the stream was routed with): each request in flight takes one, as a unary call does,
    so one stream cannot queue requests in Triton without limit."""

    __slots__ = ("extra", "model", "slots", "worker")

    def __init__(self, slots: Any, worker: WorkerEndpoint, model: str) -> None:
        self.slots, self.worker, self.model = slots, worker, model
        self.extra = 0

    def take(self) -> None:
        """A slot for the next request; refused at once, never waited for, when none is free."""
        if not self.slots.free(self.worker):
            raise ResourceExhausted(
                f"model {self.model} is overloaded: this stream's worker has no slot free for "
                "another request; retry after 1s, or send fewer requests at once",
                subject=f"model_concurrency:{self.model}",
                retry_after_s=1.0,
            )
        self.slots.take(self.worker)
        self.extra += 1

    def finished(self) -> None:
        """A request was answered: a slot beyond the stream's own is given back."""
        if self.extra:
            self.extra -= 1
            self.slots.release(self.worker)

    def release(self) -> None:
        while self.extra:
            self.finished()


async def _pump(
    first: Request,
    requests: AsyncIterator[Request],
    asked: tuple[str, str],
    routed: tuple[str, str],
    ref: str,
    meter: StreamMeter,
    held: _RequestSlots,
    upstream: Any,
    refusal: list[Exception],
) -> None:
    """Writes the caller's requests to the worker, each metered and renamed, until they
    end or one is refused; then half-closes, so the stream ends once the requests sent
    have been answered (and then with the refusal's status)."""
    try:
        request: Request | None = first
        while request is not None:
            request.model_name, request.model_version = routed
            await upstream.write(request)
            request = await anext(requests, None)
            if request is None:
                break
            if (request.model_name, request.model_version) != asked:
                raise InvalidArgument(
                    "model_name",
                    f"this stream serves {ref}, the model its first request named; "
                    "open another stream for another model",
                )
            held.take()
            await meter.reserve(request, ref)
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        return  # the stream ended upstream: its status says why
    except Exception as exc:  # a refusal, or a bug: the call ends with it either way
        refusal.append(exc)
    with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
        await upstream.done_writing()
