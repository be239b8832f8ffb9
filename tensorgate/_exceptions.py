"""The SDK's one exception type and the function that turns gRPC errors into it."""

from __future__ import annotations

import grpc


class TensorgateClientError(Exception):
    """A call to tensorgate failed; `code` is the gRPC status (see DESIGN.md's error contract)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(
            f"{code.name}: {message}" + (f" (request id {request_id})" if request_id else "")
        )
        self.code = code
        self.message = message
        self.request_id = request_id


def metadata_value(metadata: object, key: str) -> str | bytes | None:
    """The value of `key` in call metadata (a sequence of key/value pairs), if present."""
    for item_key, value in metadata or ():  # type: ignore[attr-defined]
        if item_key == key:
            return value  # type: ignore[no-any-return]
    return None


def from_rpc_error(exc: grpc.aio.AioRpcError) -> TensorgateClientError:
    request_id = metadata_value(exc.trailing_metadata(), "x-request-id")
    return TensorgateClientError(
        exc.code(), exc.details() or "", request_id if isinstance(request_id, str) else ""
    )
