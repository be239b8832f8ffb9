"""The control-plane APIs at the gateway, the one public address: forwarded as bytes.

The model registry's and the auth service's RPCs (all four kinds: uploads stream in,
downloads and the change feed stream out) are passed on unchanged, through the same
pipeline as inference calls: request id, log line, metrics, and the caller's key.
The registry's calls need an admin key; the auth service checks its own.
Messages are not decoded here: the service behind validates them, and its statuses,
carrying its request id, reach the caller as they came.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from tensorgate.auth.v1 import auth_pb2
from tensorgate.client_streams import ACCEPTED, is_accepted
from tensorgate.registry.v1 import registry_pb2
from tensorgate.registry_client import ACTOR_KEY

from gateway.authentication import require_admin
from services.runtime import calls
from services.runtime.errors import upstream_error
from services.runtime.server import ServiceBinding

Context = grpc.aio.ServicerContext[Any, Any]

REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"]
AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
# Auth calls for gateways on the internal network, never offered to callers.
AUTH_INTERNAL = frozenset({"Authenticate", "RecordUsage", "WatchKeys"})


def _forwarded_metadata() -> tuple[tuple[str, str | bytes], ...]:
    """The gateway's own metadata, the caller's key, and who acts, for the records.

    With keys checked, who acts is the key the gateway accepted (`key:<id>`), whatever
    the caller claims: an audit trail must not take a caller's word for who it is. Only
    a gateway run without authentication passes on the name the caller gave.
    """
    call = calls.current()
    own: list[tuple[str, str | bytes]] = list(calls.outgoing_metadata())
    if call is None:
        return tuple(own)
    own += [(k, v) for k, v in call.metadata if k == "authorization"]
    if call.principal is not None:
        own.append((ACTOR_KEY, f"key:{call.principal.key_id}"))
    else:
        own += [(k, v) for k, v in call.metadata if k == ACTOR_KEY]
    return tuple(own)


async def _pump(requests: AsyncIterator[bytes], upstream: Any) -> None:
    """Writes the caller's messages upstream until they end (then half-closes) or the
    service behind ends the call: a caller gone quiet (a stalled upload the registry
    gave up on) hears the service's status at once, not when it next sends."""
    ended = asyncio.Event()
    upstream.add_done_callback(lambda _: ended.set())
    upstream_done = asyncio.ensure_future(ended.wait())
    try:
        while True:
            message = asyncio.ensure_future(anext(requests, None))
            await asyncio.wait({message, upstream_done}, return_when=asyncio.FIRST_COMPLETED)
            if not message.done():
                message.cancel()
                with contextlib.suppress(BaseException):
                    await message
                return  # the service behind ended the call: its status says why
            chunk = message.result()
            if chunk is None:
                await upstream.done_writing()
                return
            await upstream.write(chunk)
    finally:
        upstream_done.cancel()


class ServiceProxy:
    """Forwards one service's calls over a long-lived channel to where it runs."""

    def __init__(
        self,
        service: ServiceDescriptor,
        channel: grpc.aio.Channel,
        *,
        subject: str,
        hidden: frozenset[str] = frozenset(),
        admin_only: frozenset[str] = frozenset(),
    ) -> None:
        """`hidden` methods are not offered; `admin_only` ones need an admin key (checked
        only when the gateway authenticates callers)."""
        self._service = service
        self._channel = channel
        self._subject = subject
        self._hidden = hidden
        self._admin_only = admin_only

    def binding(self) -> ServiceBinding:
        handlers = {
            m.name: self._handler(m) for m in self._service.methods if m.name not in self._hidden
        }
        return ServiceBinding(self._service.full_name, handlers)

    def _admitted(self, method: str) -> None:
        call = calls.current()
        # No principal and no key check: a gateway run without authentication.
        if method in self._admin_only and call is not None and call.principal is not None:
            require_admin(call.principal, f"{self._service.name}.{method}")

    def _handler(self, method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
        path = f"/{self._service.full_name}/{method.name}"
        streams_in, streams_out = method.client_streaming, method.server_streaming
        if streams_in and streams_out:
            raise AssertionError(f"{path}: bidirectional calls are not forwarded")
        if streams_out:
            return grpc.unary_stream_rpc_method_handler(self._stream_out(method.name, path))
        if streams_in:
            return grpc.stream_unary_rpc_method_handler(self._stream_in(method.name, path))
        return grpc.unary_unary_rpc_method_handler(self._unary(method.name, path))

    def _unary(self, name: str, path: str) -> Callable[[bytes, Context], Any]:
        call = self._channel.unary_unary(path, None, None)

        async def forward(request: bytes, context: Context) -> bytes:
            self._admitted(name)
            try:
                response: bytes = await call(
                    request, timeout=calls.remaining(), metadata=_forwarded_metadata()
                )
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, self._subject) from exc
            return response

        return forward

    def _stream_in(self, name: str, path: str) -> Callable[[AsyncIterator[bytes], Context], Any]:
        open_call = self._channel.stream_unary(path, None, None)

        async def forward(requests: AsyncIterator[bytes], context: Context) -> bytes:
            # The handshake of tensorgate.client_streams, hop by hop: the caller's first
            # message is in before any refusal, and the caller is told to stream on only
            # once the service behind accepted that message.
            requests = aiter(requests)
            first = await anext(requests, None)
            self._admitted(name)
            # No request iterator: grpc then takes the messages from upstream.write.
            upstream = open_call(  # type: ignore[call-arg]
                timeout=calls.remaining(), metadata=_forwarded_metadata()
            )
            try:
                with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    # A write fails once the service behind ended the call: its status
                    # (awaited below) says why.
                    if first is None:
                        await upstream.done_writing()
                    else:
                        await upstream.write(first)
                        # Not accepted: the service behind refused, and ended the call.
                        if is_accepted(await upstream.initial_metadata()):
                            await context.send_initial_metadata(ACCEPTED)
                            await _pump(requests, upstream)
                response: bytes = await upstream
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, self._subject) from exc
            finally:
                if not upstream.done():
                    upstream.cancel()  # the caller went away: so does the upstream call
            return response

        return forward

    def _stream_out(self, name: str, path: str) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        open_stream = self._channel.unary_stream(path, None, None)

        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            self._admitted(name)
            stream = open_stream(request, timeout=calls.remaining(), metadata=_forwarded_metadata())
            try:
                async for response in stream:
                    yield response
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, self._subject) from exc
            finally:
                if not stream.done():
                    stream.cancel()  # the caller went away: so does the upstream call

        return forward
