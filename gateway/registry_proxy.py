"""The model registry's API at the gateway, the one public address: forwarded as bytes.

Every ModelRegistry RPC (all four kinds: uploads stream in, downloads and the
change feed stream out) is passed to the registry unchanged, through the same
pipeline as inference calls (request id, log line, metrics; keys and admin scopes
when authentication arrives). Messages are not decoded here: the registry
validates them and its statuses, carrying its request id, reach the caller as
they came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tensorgate.registry.v1 import registry_pb2

from services.runtime import calls
from services.runtime.channels import open_channel
from services.runtime.errors import upstream_error
from services.runtime.server import ServiceBinding

Context = grpc.aio.ServicerContext[Any, Any]

_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"]
# What a caller says that the registry needs too: who acts (and, later, the key).
_FORWARDED_KEYS = ("authorization", "x-tensorgate-actor")
_SUBJECT = "the model registry"


def _forwarded_metadata() -> tuple[tuple[str, str | bytes], ...]:
    call = calls.current()
    own: list[tuple[str, str | bytes]] = list(calls.outgoing_metadata())
    if call is not None:
        own += [(k, v) for k, v in call.metadata if k in _FORWARDED_KEYS]
    return tuple(own)


class RegistryProxy:
    """Forwards ModelRegistry calls over one long-lived channel to the registry."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self._channel = open_channel(address, credentials)

    async def close(self) -> None:
        await self._channel.close(None)

    def binding(self) -> ServiceBinding:
        handlers = {m.name: self._handler(m) for m in _SERVICE.methods}
        return ServiceBinding(_SERVICE.full_name, handlers)

    def _handler(self, method: Any) -> grpc.RpcMethodHandler[Any, Any]:
        path = f"/{_SERVICE.full_name}/{method.name}"
        streams_in, streams_out = method.client_streaming, method.server_streaming
        if streams_in and streams_out:
            raise AssertionError(f"{path}: bidirectional calls are not forwarded")
        if streams_out:
            return grpc.unary_stream_rpc_method_handler(self._stream_out(path))
        if streams_in:
            return grpc.stream_unary_rpc_method_handler(self._stream_in(path))
        return grpc.unary_unary_rpc_method_handler(self._unary(path))

    def _unary(self, path: str) -> Callable[[bytes, Context], Any]:
        call = self._channel.unary_unary(path, None, None)

        async def forward(request: bytes, context: Context) -> bytes:
            try:
                response: bytes = await call(
                    request, timeout=calls.remaining(), metadata=_forwarded_metadata()
                )
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, _SUBJECT) from exc
            return response

        return forward

    def _stream_in(self, path: str) -> Callable[[AsyncIterator[bytes], Context], Any]:
        call = self._channel.stream_unary(path, None, None)

        async def forward(requests: AsyncIterator[bytes], context: Context) -> bytes:
            try:
                response: bytes = await call(
                    requests, timeout=calls.remaining(), metadata=_forwarded_metadata()
                )
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, _SUBJECT) from exc
            return response

        return forward

    def _stream_out(self, path: str) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        open_stream = self._channel.unary_stream(path, None, None)

        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            stream = open_stream(request, timeout=calls.remaining(), metadata=_forwarded_metadata())
            try:
                async for response in stream:
                    yield response
            except grpc.aio.AioRpcError as exc:
                raise upstream_error(exc, _SUBJECT) from exc
            finally:
                if not stream.done():
                    stream.cancel()  # the caller went away: so does the upstream call

        return forward
