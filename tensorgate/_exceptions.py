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


def from_rpc_error(exc: grpc.aio.AioRpcError) -> TensorgateClientError:
    request_id = ""
    for key, value in exc.trailing_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            request_id = value
    return TensorgateClientError(exc.code(), exc.details() or "", request_id)
