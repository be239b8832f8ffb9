"""The domain errors and the one place that turns them into gRPC statuses.

The tree follows the error contract in DESIGN.md: each error names its status
code, and the message is for the caller to act on. Anything that is not a
`TensorgateError` is a bug and reaches the caller as INTERNAL with the request
id only (see pipeline.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from tensorgate.errors import REQUEST_ID_KEY, STATUS_DETAILS_KEY, metadata_value
from tensorgate.key_shape import redact_keys
from tensorgate.model_ref import InvalidModelRef

_DETAILS_KEY = STATUS_DETAILS_KEY


def shown(value: str, limit: int = 64) -> str:
    """A caller's value as an error message quotes it: repr'd, cut to `limit`, and never
    with a key's secret in it (a key pasted into the wrong field)."""
    size = len(value)
    value = redact_keys(value[: limit + 80])
    return repr(value) if size <= limit else repr(value[:limit]) + f"... ({size} chars)"


class TensorgateError(Exception):
    """A failure the caller should hear about, with the status code it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> Sequence[object]:
        """google.rpc detail messages sent with the status (rich error model)."""
        return ()

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The `grpc-status-details-bin` trailer carrying the rich details, if any."""
        details = self.details()
        if not details:
            return ()
        status = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        for detail in details:
            status.details.add().Pack(detail)
        return tuple(rpc_status.to_status(status).trailing_metadata)


class UpstreamError(TensorgateError):
    """A status another tensorgate service returned, passed on as it came."""

    def __init__(self, exc: grpc.aio.AioRpcError) -> None:
        super().__init__(exc.details() or exc.code().name)
        self.code = exc.code()
        details = metadata_value(exc.trailing_metadata(), _DETAILS_KEY)
        self._trailers: tuple[tuple[str, str | bytes], ...] = (
            ((_DETAILS_KEY, details),) if details is not None else ()
        )

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers


class Unauthenticated(TensorgateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TensorgateError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(TensorgateError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(TensorgateError):
    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(TensorgateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TensorgateError):
    """The system is not in the state the call needs (an alias moved, a version in use)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DataLoss(TensorgateError):
    """Stored data is corrupt (an artifact whose bytes no longer match its sha256)."""

    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceeded(TensorgateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TensorgateError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(TensorgateError):
    """A call this service deliberately does not offer; the message says what to use."""

    code = grpc.StatusCode.UNIMPLEMENTED


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(TensorgateError):
    """Bad input; names the offending field(s) in the message and a BadRequest detail."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.violations = (FieldViolation(field, description),)

    def details(self) -> Sequence[object]:
        return (
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            ),
        )


class ResourceExhausted(TensorgateError):
    """Over a quota or over capacity; says which and when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, subject: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.subject = subject
        self.retry_after_s = retry_after_s

    def details(self) -> Sequence[object]:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=self.subject, description=self.message
                )
            ]
        )
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
        return (quota, retry)


def as_domain_error(exc: BaseException) -> TensorgateError | None:
    """`exc` as the most specific domain error, or None if it is a bug (-> INTERNAL).

    The one table for foreign errors whose meaning is known: the contract's
    helpers raise plain ValueErrors so that they need nothing from the services.
    """
    if isinstance(exc, TensorgateError):
        return exc
    if isinstance(exc, InvalidModelRef):
        return InvalidArgument("model", str(exc))
    return None


class UpstreamFailure(RuntimeError):
    """An upstream failed in a way no status of ours explains: logged in full, and the
    caller gets INTERNAL with the request id only (so deliberately not a TensorgateError)."""


def upstream_error(exc: grpc.aio.AioRpcError, subject: str) -> Exception:
    """What a failed call to an upstream (a worker, Triton) means for our caller.

    The one upstream-error mapper. A status a tensorgate service chose carries its
    request id trailer and is passed on as it came. Anything else (Triton's statuses,
    transport failures) is told in our words about `subject` (e.g. "model digits:1"),
    so upstream addresses and gRPC internals stay out of the caller's view.
    """
    if metadata_value(exc.trailing_metadata(), REQUEST_ID_KEY) is not None:
        return UpstreamError(exc)
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # Triton's own words on a tensor it refused are what the caller needs.
        return InvalidArgument("inputs", details or f"{subject} refused the inputs")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline passed while {subject} was running")
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"the call to {subject} was cancelled")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
        return Unavailable(f"{subject} is unavailable right now; retry shortly")
    return UpstreamFailure(f"{subject}: upstream answered {code.name}: {details}")
