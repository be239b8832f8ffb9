"""tensorgate.errors.from_rpc_error without sockets: status codes to typed errors, and the
google.rpc rich details (BadRequest, QuotaFailure, RetryInfo) in the trailers onto them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from tensorgate.errors import (
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorgateClientError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)

Trailers = Sequence[tuple[str, str | bytes]]


class FakeRpcError(grpc.RpcError):
    """What a failed call raises, as the sync stubs (a tuple of trailers) or asyncio ones do."""

    def __init__(self, code: grpc.StatusCode, details: str | None, trailers: object = ()) -> None:
        super().__init__()
        self._code = code
        self._details = details
        self._trailers = trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details

    # Any: the stubs name a private class; grpc gives (key, value) tuples or grpc.aio.Metadata.
    def trailing_metadata(self) -> Any:
        return self._trailers


def rich_trailers(code: grpc.StatusCode, *details: Message, request_id: str = "req-1") -> Trailers:
    """The trailers a tensorgate service sends with a rich error."""
    status = status_pb2.Status(code=code.value[0], message="from the service")
    for detail in details:
        status.details.add().Pack(detail)
    return (("x-request-id", request_id), ("grpc-status-details-bin", status.SerializeToString()))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, CancelledError),
        (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError),
        (grpc.StatusCode.INTERNAL, InternalError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
        (grpc.StatusCode.DATA_LOSS, DataLossError),
    ],
)
def test_each_status_has_its_own_error(
    code: grpc.StatusCode, expected: type[TensorgateClientError]
) -> None:
    error = from_rpc_error(FakeRpcError(code, "what went wrong", (("x-request-id", "req-7"),)))
    assert type(error) is expected
    assert (error.code, error.message, error.request_id) == (code, "what went wrong", "req-7")
    assert str(error) == f"{code.name}: what went wrong (request id req-7)"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ],
)
def test_other_statuses_become_the_base_error(code: grpc.StatusCode) -> None:
    error = from_rpc_error(FakeRpcError(code, "odd"))
    assert type(error) is TensorgateClientError
    assert error.code is code
    assert error.request_id == ""
    assert str(error) == f"{code.name}: odd"


def test_bad_request_becomes_violations() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="max_tokens", description="< 1"),
            error_details_pb2.BadRequest.FieldViolation(field="top_p", description="> 1"),
        ]
    )
    code = grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(FakeRpcError(code, "max_tokens: < 1", rich_trailers(code, bad)))
    assert isinstance(error, InvalidArgumentError)
    assert error.violations == (("max_tokens", "< 1"), ("top_p", "> 1"))
    assert error.request_id == "req-1"


def test_quota_failure_and_retry_info_become_subject_and_retry_after() -> None:
    quota = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject="key:k1/tokens", description="over")
        ]
    )
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromNanoseconds(1_500_000_000)
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(FakeRpcError(code, "over quota", rich_trailers(code, quota, retry)))
    assert isinstance(error, ResourceExhaustedError)
    assert error.subject == "key:k1/tokens"
    assert error.retry_after_s == pytest.approx(1.5)


def test_asyncio_metadata_trailers_are_read_too() -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="model")]
    )
    trailers = grpc.aio.Metadata(*rich_trailers(code, bad, request_id="req-aio"))
    error = from_rpc_error(FakeRpcError(code, "model: bad", trailers))
    assert isinstance(error, InvalidArgumentError)
    assert error.violations == (("model", ""),)
    assert error.request_id == "req-aio"


def test_without_details_the_defaults_stay() -> None:
    invalid = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", None))
    exhausted = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, None))
    assert isinstance(invalid, InvalidArgumentError)
    assert invalid.violations == ()
    assert isinstance(exhausted, ResourceExhaustedError)
    assert (exhausted.subject, exhausted.retry_after_s, exhausted.message) == ("", None, "")


def test_details_that_do_not_fit_the_status_are_ignored() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="model")]
    )
    code = grpc.StatusCode.NOT_FOUND
    error = from_rpc_error(FakeRpcError(code, "no such model", rich_trailers(code, bad)))
    assert type(error) is NotFoundError
    assert not hasattr(error, "violations")


def test_a_malformed_details_trailer_still_gives_the_error() -> None:
    trailers = (("x-request-id", "req-2"), ("grpc-status-details-bin", b"\xff\x00not a status"))
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", trailers))
    assert isinstance(error, InvalidArgumentError)
    assert (error.violations, error.request_id) == ((), "req-2")
