"""The one request pipeline every service's handlers run in, for all four RPC kinds.

Stages, in order: request context (request id, deadline, peer) -> authentication ->
quota reservation -> the handler -> error mapping, quota settlement, the canonical
log line and the metrics. `Pipeline.wrap` applies them to a method handler once, when
the server is built: no per-call interceptor dispatch, and a stage a service does not
configure is not in the wrapped handler at all.

Anything a handler raises that is not a domain error (errors.py) is a bug: the caller
gets INTERNAL with the request id only, and the traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog
from tensorgate.errors import REQUEST_ID_KEY
from tensorgate.key_shape import redact_keys

from services.runtime import calls
from services.runtime.access import Authenticator, QuotaGate, QuotaReservation
from services.runtime.calls import Call
from services.runtime.errors import InvalidArgument, TensorgateError, as_domain_error
from services.runtime.logging import rpc_line
from services.runtime.metrics import ServiceMetrics

log = structlog.get_logger("tensorgate.rpc")

Context = grpc.aio.ServicerContext[Any, Any]

_EXPECTED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})


class _Undecodable:
    """Stands in for request bytes that did not parse, so the call can say so."""

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


def _passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    # A handler may return bytes it got from upstream already serialized (the
    # gateway does): they go out as they are instead of a parse and re-encode.
    if serializer is None:
        return None

    def serialize(message: Any) -> bytes:
        return message if type(message) is bytes else serializer(message)

    return serialize


def _check_decoded(request: Any, method: str) -> None:
    if type(request) is _Undecodable:
        raise InvalidArgument("request", f"is not a valid message for {method}: {request.error}")


# A request id needs to be unique, not secret: a random per-process prefix and a
# counter are unique across processes and cost far less than a uuid4 per call.
_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def _request_id(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    for key, value in metadata:
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            # Logged and echoed back: never a key's secret, whatever a caller sends.
            return redact_keys(value)
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def _final_code(context: Context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class Pipeline:
    """Wraps a service's method handlers in the stages it has configured."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        *,
        authenticator: Authenticator | None = None,
        quota: QuotaGate | None = None,
    ) -> None:
        self._metrics = metrics
        self._authenticator = authenticator
        self._quota = quota
        # Set by the server when its shutdown grace period has run out: the calls
        # grpc cancels then were cut off by us, not cancelled by their callers.
        self.cut_off = False

    # -- the stages around a call -------------------------------------------------

    def _open(self, method: str, context: Context) -> Call:
        started = time.perf_counter()
        # Everything needed from the context is read now: grpc.aio may crash on a
        # context touched after its call ended (seen with an expired deadline).
        metadata = tuple(context.invocation_metadata() or ())
        remaining = context.time_remaining()
        call = Call(
            method=method,
            request_id=_request_id(metadata),
            started=started,
            deadline=None if remaining is None else started + remaining,
            peer=context.peer(),
            metadata=metadata,
        )
        calls.enter(call)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    def _cancelled_code(self, call: Call) -> grpc.StatusCode:
        # grpc.aio cancels the handler when the caller cancels, when the deadline
        # passes, and when shutdown's grace runs out (the caller sees UNAVAILABLE).
        if self.cut_off:
            return grpc.StatusCode.UNAVAILABLE
        if call.deadline is not None and time.perf_counter() >= call.deadline:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    @staticmethod
    async def _abort(
        call: Call, context: Context, exc: Exception, domain: TensorgateError | None
    ) -> None:
        """Ends the call with the status `exc` maps to (context.abort raises)."""
        if domain is None:
            log.error("unhandled error", exc_info=exc)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {call.request_id})"
            )
            return
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id), *domain.trailers()))
        await context.abort(domain.code, domain.message)

    async def _close(
        self, call: Call, code: grpc.StatusCode, reservation: QuotaReservation | None
    ) -> None:
        if reservation is not None:
            try:
                if code == grpc.StatusCode.OK:
                    await reservation.settle(call.usage)
                else:
                    await reservation.release()
            except Exception:  # settling must not turn a served call into a failure
                log.exception("quota settlement failed")
        seconds = time.perf_counter() - call.started
        self._metrics.observe(call.method, code, seconds)
        fields = call.fields
        fields["request_id"] = call.request_id
        fields["method"] = call.method
        fields["status"] = code.name
        fields["duration_ms"] = round(seconds * 1000, 3)
        fields["peer"] = call.peer
        if code in _EXPECTED:
            rpc_line(logging.INFO, fields)
        elif code == grpc.StatusCode.INTERNAL:
            rpc_line(logging.ERROR, fields)
        else:
            rpc_line(logging.WARNING, fields)

    # -- one wrapper per RPC kind -------------------------------------------------

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        """`handler` with every stage around it (same (de)serializers, same wire shape)."""
        deserializer = _lenient(handler.request_deserializer)
        serializer = _passthrough(handler.response_serializer)
        kinds: list[tuple[Any, bool, bool]] = [
            (handler.unary_unary, False, False),
            (handler.unary_stream, False, True),
            (handler.stream_unary, True, False),
            (handler.stream_stream, True, True),
        ]
        for behavior, client_streams, server_streams in kinds:
            if behavior is None:
                continue
            # grpc.aio receives a unary request whole before it calls the handler, so a
            # caller without a key could make the service take in and hold requests of
            # up to the message limit each. With an authenticator, a unary request is
            # served as a client stream of one message, read once the key is accepted.
            # The wire is the same: a gRPC message is framed alike in both kinds.
            reads_late = self._authenticator is not None and not client_streams
            make = _HANDLER_KINDS[(client_streams or reads_late, server_streams)]
            wrapped = (self._streaming if server_streams else self._responding)(
                method, behavior, client_streams, reads_late
            )
            return make(wrapped, request_deserializer=deserializer, response_serializer=serializer)
        return handler

    async def _admit(
        self, call: Call, request: Any, context: Context, client_streams: bool, reads_late: bool
    ) -> tuple[Any, QuotaReservation | None]:
        """Authenticates, then reads and checks the request, then reserves quota.

        Returns the request as the handler gets it and the reservation to settle.
        """
        try:
            # The stages inline, not as coroutines of their own: this runs on every call.
            authenticator, quota = self._authenticator, self._quota
            if authenticator is not None:
                principal = call.principal = await authenticator.authenticate(call)
                if principal is not None:
                    call.fields["key_id"] = principal.key_id
                    call.fields["tenant"] = principal.tenant
            if reads_late:
                request = await _read_one(context, call.method)
            admitted = self._admitted(call, request, client_streams)
            if quota is None:
                return admitted, None
            return admitted, await quota.reserve(call, None if client_streams else admitted)
        except Exception:
            if client_streams:
                await _hear_first(request)
            raise

    def _admitted(self, call: Call, request: Any, client_streams: bool) -> Any:
        """The request as the handler gets it; notes the model it names."""
        if client_streams:
            return _checked(request, call.method)
        _check_decoded(request, call.method)
        model = getattr(request, "model", None)
        if type(model) is str and model:
            # A caller's string: bounded, so a huge one cannot flood the logs, and never a
            # key's secret (a key pasted into the model field). Redacted before it is cut:
            # a key cut at the bound would no longer look like one.
            call.fields["model"] = redact_keys(model[:256])[:128]
        return request

    def _responding(
        self,
        method: str,
        behavior: Callable[[Any, Any], Any],
        client_streams: bool,
        reads_late: bool,
    ) -> Any:
        """Unary-unary and stream-unary: one response."""

        async def handle(request: Any, context: Context) -> Any:
            call = self._open(method, context)
            code, reservation = grpc.StatusCode.OK, None
            try:
                request, reservation = await self._admit(
                    call, request, context, client_streams, reads_late
                )
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = self._cancelled_code(call)
                raise
            except grpc.aio.AbortError:
                code = _final_code(context)
                raise
            except Exception as exc:
                domain = as_domain_error(exc)
                code = domain.code if domain is not None else grpc.StatusCode.INTERNAL
                await self._abort(call, context, exc, domain)
            finally:
                await self._close(call, code, reservation)

        return handle

    def _streaming(
        self,
        method: str,
        behavior: Callable[[Any, Any], Any],
        client_streams: bool,
        reads_late: bool,
    ) -> Any:
        """Unary-stream and stream-stream: an async generator of responses."""

        async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
            call = self._open(method, context)
            code, reservation = grpc.StatusCode.OK, None
            responses: Any = None
            try:
                request, reservation = await self._admit(
                    call, request, context, client_streams, reads_late
                )
                responses = behavior(request, context)
                async for response in responses:
                    yield response
            except (asyncio.CancelledError, GeneratorExit):
                code = self._cancelled_code(call)
                raise
            except grpc.aio.AbortError:
                code = _final_code(context)
                raise
            except Exception as exc:
                domain = as_domain_error(exc)
                code = domain.code if domain is not None else grpc.StatusCode.INTERNAL
                await self._abort(call, context, exc, domain)
            finally:
                # A stream cut off at a yield (grpc cancels the call while it sends) is
                # closed first: its own cleanup notes what it streamed, then that is settled.
                aclose = getattr(responses, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                await self._close(call, code, reservation)

        return handle


# grpc's handler constructor by (the request streams, the response streams).
_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., Any]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


# What context.read() returns once a client stream has ended (not in grpc's stubs).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


async def _read_one(context: Context, method: str) -> Any:
    """The one request message of a unary method served as a client stream."""
    request = await context.read()
    if request is _EOF:
        raise InvalidArgument("request", f"is missing: {method} takes one request message")
    return request


# How long a refused client stream's first message is waited for (see _hear_first).
_FIRST_MESSAGE_S = 1.0


async def _hear_first(requests: AsyncIterator[Any]) -> None:
    """Receives a refused client stream's first message before the refusal goes out.

    A grpc.aio client whose write is still in flight when the status arrives sees
    INTERNAL in place of it (grpc/grpc#36066). Once its first message is in, a client
    that waits to be accepted (tensorgate.client_streams) has nothing more in flight.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(anext(aiter(requests), None), _FIRST_MESSAGE_S)


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    """A client stream's messages, refusing one whose bytes did not parse."""
    async for request in requests:
        _check_decoded(request, method)
        yield request
