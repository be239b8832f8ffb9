"""What every asyncio client of the SDK shares: one channel to one address, closed by
`async with`, and unary calls whose failures become `tensorgate.errors`."""

from __future__ import annotations

from types import TracebackType
from typing import Self, TypeVar

import grpc

from tensorgate.channel_options import CHANNEL_OPTIONS
from tensorgate.errors import from_rpc_error

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncChannelClient:
    """One channel to `address` (TLS when `credentials` are given)."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout: float | None = None,
    ) -> None:
        self.address = address
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self._metadata = metadata
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
