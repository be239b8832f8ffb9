"""Typed errors for callers of tensorgate, and the one mapping from gRPC errors to them.

    TensorgateClientError                 any failed call; .code, .message, .request_id
    ├── UnauthenticatedError              no, unknown, revoked or expired key
    ├── PermissionDeniedError             the key may not use that model
    ├── NotFoundError                     unknown model, version or alias
    ├── AlreadyExistsError                the name is taken (a model, ...)
    ├── InvalidArgumentError              .violations: (field, description) pairs
    ├── FailedPreconditionError           the system is not in a state to do it
    ├── ResourceExhaustedError            over quota or overloaded; .subject, .retry_after_s
    ├── UnavailableError                  no healthy worker, or the gateway is unreachable
    ├── DeadlineExceededError
    ├── CancelledError
    ├── UnimplementedError
    ├── DataLossError                     stored or received bytes do not match their sha256
    └── InternalError                     a bug; quote the request id when reporting it

The services send google.rpc rich details (BadRequest, QuotaFailure, RetryInfo) in the
`grpc-status-details-bin` trailer; `from_rpc_error` unpacks them onto the exception.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_KEY = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def metadata_value(metadata: object, key: str) -> str | bytes | None:
    """The value of `key` in call metadata (a sequence of key/value pairs), if present."""
    for item_key, value in metadata or ():  # type: ignore[attr-defined]
        if item_key == key:
            return value  # type: ignore[no-any-return]
    return None


class TensorgateClientError(Exception):
    """A call to tensorgate failed; `code` is its gRPC status (DESIGN.md's error contract)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        super().__init__(
            f"{code.name}: {message}" + (f" (request id {request_id})" if request_id else "")
        )
        self.code = code
        self.message = message
        self.request_id = request_id


class UnauthenticatedError(TensorgateClientError):
    pass


class PermissionDeniedError(TensorgateClientError):
    pass


class NotFoundError(TensorgateClientError):
    pass


class AlreadyExistsError(TensorgateClientError):
    pass


class InvalidArgumentError(TensorgateClientError):
    """`violations` holds (field, description) for each bad field the service named."""

    violations: Sequence[tuple[str, str]] = ()


class FailedPreconditionError(TensorgateClientError):
    pass


class ResourceExhaustedError(TensorgateClientError):
    """Over a quota or over capacity: `subject` names which, `retry_after_s` says when."""

    subject: str = ""
    retry_after_s: float | None = None


class UnavailableError(TensorgateClientError):
    pass


class DeadlineExceededError(TensorgateClientError):
    pass


class CancelledError(TensorgateClientError):
    pass


class UnimplementedError(TensorgateClientError):
    pass


class DataLossError(TensorgateClientError):
    pass


class InternalError(TensorgateClientError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TensorgateClientError]] = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def from_rpc_error(exc: grpc.RpcError) -> TensorgateClientError:
    """The most specific typed error for a failed call (sync or asyncio)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    trailers = exc.trailing_metadata()
    request_id = metadata_value(trailers, REQUEST_ID_KEY)
    error = _BY_CODE.get(code, TensorgateClientError)(
        code, details, request_id if isinstance(request_id, str) else ""
    )
    raw = metadata_value(trailers, STATUS_DETAILS_KEY)
    if isinstance(raw, bytes):
        _attach_details(error, raw)
    return error


def _attach_details(error: TensorgateClientError, raw: bytes) -> None:
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # a malformed trailer must not hide the error itself
        return
    for any_detail in status.details:
        if isinstance(error, InvalidArgumentError) and any_detail.Is(
            error_details_pb2.BadRequest.DESCRIPTOR
        ):
            bad = error_details_pb2.BadRequest()
            any_detail.Unpack(bad)
            error.violations = tuple((v.field, v.description) for v in bad.field_violations)
        elif isinstance(error, ResourceExhaustedError):
            if any_detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                any_detail.Unpack(quota)
                if quota.violations:
                    error.subject = quota.violations[0].subject
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                error.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
