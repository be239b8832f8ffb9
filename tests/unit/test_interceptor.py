"""The shared server runtime on a real in-process server: error mapping, request ids, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tensorgate.errors import metadata_value

from services.runtime.errors import InvalidArgument, ResourceExhausted
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import GrpcService
from services.runtime.settings import ServiceSettings


async def _boom(request: bytes, context: Any) -> bytes:
    raise RuntimeError("secret internal detail")


async def _invalid(request: bytes, context: Any) -> bytes:
    raise InvalidArgument("prompt", "must not be empty")


async def _quota(request: bytes, context: Any) -> bytes:
    raise ResourceExhausted("tokens per minute exceeded", subject="key:k1", retry_after_s=3)


async def _echo(request: bytes, context: Any) -> bytes:
    return request


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in [("Boom", _boom), ("Invalid", _invalid), ("Quota", _quota), ("Echo", _echo)]
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))


@pytest.fixture(scope="module")
async def service() -> AsyncIterator[GrpcService]:
    running = GrpcService(
        ServiceSettings(drain_seconds=0, grace_seconds=0),
        name="test",
        service_names=["test.Svc"],
        register=_register,
        metrics=ServiceMetrics("t"),
    )
    await running.start()
    yield running
    await running.stop()


async def _call(service: GrpcService, method: str, request_id: str = "") -> grpc.aio.AioRpcError:
    metadata = (("x-request-id", request_id),) if request_id else None
    async with grpc.aio.insecure_channel(service.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(f"/test.Svc/{method}", None, None)(b"x", metadata=metadata)
    return error.value


def _trailer(error: grpc.aio.AioRpcError, key: str) -> str:
    value = metadata_value(error.trailing_metadata(), key)
    assert isinstance(value, str)
    return value


async def test_a_bug_is_internal_with_the_request_id_only(service: GrpcService) -> None:
    error = await _call(service, "Boom")
    request_id = _trailer(error, "x-request-id")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == f"internal error (request id {request_id})"
    assert "secret" not in (error.details() or "")


async def test_the_callers_request_id_is_kept(service: GrpcService) -> None:
    error = await _call(service, "Boom", request_id="req-123")
    assert _trailer(error, "x-request-id") == "req-123"
    assert "req-123" in (error.details() or "")


async def test_invalid_argument_carries_a_bad_request_detail(service: GrpcService) -> None:
    error = await _call(service, "Invalid")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "prompt: must not be empty"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field == "prompt"


async def test_over_quota_says_which_and_when_to_retry(service: GrpcService) -> None:
    error = await _call(service, "Quota")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(quota) and status.details[1].Unpack(retry)
    assert quota.violations[0].subject == "key:k1"
    assert retry.retry_delay.seconds == 3


async def test_every_call_is_counted_by_status(service: GrpcService) -> None:
    def count(method: str, code: str) -> float:
        labels = {"service": "t", "method": f"/test.Svc/{method}", "code": code}
        return (
            service.metrics.registry.get_sample_value("tensorgate_rpc_requests_total", labels) or 0
        )

    ok, internal = count("Echo", "OK"), count("Boom", "INTERNAL")
    async with grpc.aio.insecure_channel(service.address) as channel:
        assert await channel.unary_unary("/test.Svc/Echo", None, None)(b"hi") == b"hi"
    await _call(service, "Boom")
    assert (count("Echo", "OK"), count("Boom", "INTERNAL")) == (ok + 1, internal + 1)


async def test_a_taken_port_is_refused_at_start(service: GrpcService) -> None:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{service.port}"):
        GrpcService(
            ServiceSettings(port=service.port),
            name="second",
            service_names=["test.Svc"],
            register=_register,
            metrics=ServiceMetrics("t2"),
        )
