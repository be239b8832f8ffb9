"""Server interceptors: request context, canonical log line, metrics and error mapping.

One interceptor wraps every service handler so that each call gets a request
id (the caller's `x-request-id` or a new one) bound into the log context, ends
with exactly one log line (method, model, status, duration, plus whatever the
handler bound), is counted in the metrics, and turns domain errors into their
status codes. Anything unexpected becomes INTERNAL carrying only the request id.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from services.runtime.errors import InvalidArgument, as_domain_error
from services.runtime.metrics import ServiceMetrics

REQUEST_ID_KEY = "x-request-id"
# Health checks and reflection are infrastructure; they get no per-call line.
_QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

log = structlog.get_logger("tensorgate.rpc")

# The current call's request id, for handlers that pass it on to other services.
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="")


def request_id_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the call can say so."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc answers UNKNOWN when deserializing fails; catching it here lets the
    # call answer INVALID_ARGUMENT through the same path as every other error.
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return deserialize


def _check_decoded(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("request", f"is not a valid message for {method}: {request.error}")


class _Call:
    """Book-keeping for one call: binds its context, then logs and counts its end."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context
        self.request_id = request_id_of(context)
        self.started = time.perf_counter()
        # Read what is needed from the context now: grpc.aio may crash on a
        # context touched after its call ended (seen with an expired deadline).
        self.peer = context.peer()
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.started + remaining
        current_request_id.set(self.request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=self.request_id, method=method)
        model = getattr(request, "model", None)
        if isinstance(model, str) and model:
            # A caller's string: bounded, so a huge one cannot flood the logs.
            structlog.contextvars.bind_contextvars(model=model[:128])
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    async def fail(self, exc: BaseException) -> None:
        """Maps `exc` to a status and aborts the call with it (abort raises)."""
        domain = as_domain_error(exc)
        if domain is not None:
            exc = domain
            trailers = ((REQUEST_ID_KEY, self.request_id), *exc.trailers())
            self.context.set_trailing_metadata(trailers)
            await self.context.abort(exc.code, exc.message)
        log.error("unhandled error", exc_info=exc)
        await self.context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {self.request_id})"
        )

    def cancelled_code(self) -> grpc.StatusCode:
        # grpc.aio cancels the handler both when the caller cancels and when the
        # deadline passes; only the clock tells them apart.
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def finish(self, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - self.started
        self.metrics.observe(self.method, code.name, seconds)
        level = "info" if code in _EXPECTED_CODES else "warning"
        if code == grpc.StatusCode.INTERNAL:
            level = "error"
        log.log(
            _LEVELS[level],
            "rpc",
            status=code.name,
            duration_ms=round(seconds * 1000, 3),
            peer=self.peer,
        )


_LEVELS = {"info": 20, "warning": 30, "error": 40}
_EXPECTED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}


def _final_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN


def _wrap_unary(
    metrics: ServiceMetrics, method: str, behavior: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(metrics, method, request, context)
        code = grpc.StatusCode.OK
        try:
            _check_decoded(request, method)
            return await behavior(request, context)
        except asyncio.CancelledError:
            code = call.cancelled_code()
            raise
        except grpc.aio.AbortError:
            code = _final_code(context)
            raise
        except Exception as exc:
            domain = as_domain_error(exc)
            code = domain.code if domain is not None else grpc.StatusCode.INTERNAL
            await call.fail(exc)
        finally:
            call.finish(code)

    return handle


def _wrap_stream(
    metrics: ServiceMetrics, method: str, behavior: Callable[[Any, Any], AsyncIterator[Any]]
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handle(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call = _Call(metrics, method, request, context)
        code = grpc.StatusCode.OK
        try:
            _check_decoded(request, method)
            async for response in behavior(request, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            code = call.cancelled_code()
            raise
        except grpc.aio.AbortError:
            code = _final_code(context)
            raise
        except Exception as exc:
            domain = as_domain_error(exc)
            code = domain.code if domain is not None else grpc.StatusCode.INTERNAL
            await call.fail(exc)
        finally:
            call.finish(code)

    return handle


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


class ServiceInterceptor(_Interceptor):
    """Wraps unary-unary and unary-stream handlers; other kinds pass through untouched."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(self._metrics, method, handler.unary_unary),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                # In grpc.aio a streaming behavior is an async generator; the
                # (sync-era) stubs type it as returning an Iterator.
                _wrap_stream(self._metrics, method, handler.unary_stream),  # type: ignore[arg-type]
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
