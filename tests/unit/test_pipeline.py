"""The request pipeline on a real in-process server, for all four RPC kinds.

Each kind gets a request id (the caller's or a new one) in its trailers, one canonical
JSON log line, a count in the metrics, and its domain errors mapped to their status
codes; a bug is INTERNAL with the request id only. No Triton needed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tensorgate.errors import metadata_value
from tensorgate.inference.v1 import inference_pb2

from services.runtime import calls
from services.runtime.errors import InvalidArgument, ResourceExhausted
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import GrpcService, ServiceBinding, build_server
from services.runtime.settings import ServiceSettings

SERVICE = "test.Svc"


async def _echo(request: bytes, context: Any) -> bytes:
    calls.note(echoed=len(request))
    return request


async def _boom(request: bytes, context: Any) -> bytes:
    prompt = request.decode()  # a local a traceback could show
    raise RuntimeError(f"secret internal detail ({len(prompt)} bytes)")


async def _invalid(request: bytes, context: Any) -> bytes:
    raise InvalidArgument("prompt", "must not be empty")


async def _quota(request: bytes, context: Any) -> bytes:
    raise ResourceExhausted("tokens per minute exceeded", subject="key:k1", retry_after_s=3)


async def _typed(request: inference_pb2.GenerateRequest, context: Any) -> bytes:
    return request.prompt.encode()


async def _tokens(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """Server streaming: one response per byte; b"fail" fails after the first."""
    for index, byte in enumerate(request):
        if request == b"fail" and index == 1:
            raise InvalidArgument("prompt", "refused mid-stream")
        yield bytes([byte])
    calls.note_usage(prompt_tokens=len(request), completion_tokens=len(request))


async def _slow(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """Server streaming that sends one message, then waits to be cancelled."""
    yield request
    await asyncio.Event().wait()


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    """Client streaming: joins the chunks; a chunk b"bad" is refused."""
    received = b""
    async for chunk in requests:
        if chunk == b"bad":
            raise InvalidArgument("chunk", "is bad")
        received += chunk
    return received


async def _chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    """Bidi streaming: answers each message in upper case; b"boom" is a bug."""
    async for message in requests:
        if message == b"boom":
            raise RuntimeError("secret internal detail")
        yield message.upper()


def _binding() -> ServiceBinding:
    unary = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in [("Echo", _echo), ("Boom", _boom), ("Invalid", _invalid), ("Quota", _quota)]
    }
    return ServiceBinding(
        SERVICE,
        {
            **unary,
            "Typed": grpc.unary_unary_rpc_method_handler(
                _typed, request_deserializer=inference_pb2.GenerateRequest.FromString
            ),
            "Tokens": grpc.unary_stream_rpc_method_handler(_tokens),
            "Slow": grpc.unary_stream_rpc_method_handler(_slow),
            "Upload": grpc.stream_unary_rpc_method_handler(_upload),
            "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        },
    )


@pytest.fixture(scope="module")
async def service() -> AsyncIterator[GrpcService]:
    running = build_server(
        ServiceSettings(drain_seconds=0, grace_seconds=0),
        [_binding()],
        name="test",
        metrics=ServiceMetrics("t"),
    )
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def channel(service: GrpcService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(service.address) as opened:
        yield opened


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _rpc_lines(out: str) -> list[dict[str, Any]]:
    """This test service's canonical lines (servers of session fixtures may log too)."""
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [
        line
        for line in lines
        if line.get("event") == "rpc" and str(line.get("method", "")).startswith(f"/{SERVICE}/")
    ]


def _count(service: GrpcService, method: str, code: str) -> float:
    labels = {"service": "t", "method": _method(method), "code": code}
    value = service.metrics.registry.get_sample_value("tensorgate_rpc_requests_total", labels)
    return value or 0.0


def _trailer(error: grpc.aio.AioRpcError, key: str) -> str:
    value = metadata_value(error.trailing_metadata(), key)
    assert isinstance(value, str)
    return value


async def _call_trailer(call: Any, key: str) -> str:
    value = metadata_value(await call.trailing_metadata(), key)
    assert isinstance(value, str)
    return value


async def _fail(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_unary_ok_has_request_id_log_line_and_metric(
    service: GrpcService, channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _count(service, "Echo", "OK")
    call = channel.unary_unary(_method("Echo"), None, None)(
        b"hi", metadata=(("x-request-id", "req-1"),)
    )
    assert await call == b"hi"
    assert await _call_trailer(call, "x-request-id") == "req-1"
    assert _count(service, "Echo", "OK") == before + 1
    (line,) = _rpc_lines(capsys.readouterr().out)
    assert line["request_id"] == "req-1"
    assert line["method"] == _method("Echo")
    assert line["status"] == "OK"
    assert line["echoed"] == 2  # what the handler noted
    assert line["duration_ms"] > 0


async def test_a_bug_is_internal_with_the_request_id_only(
    channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    error = await _fail(
        channel.unary_unary(_method("Boom"), None, None)(
            b"PROMPT-TEXT-42", metadata=(("authorization", "Bearer tg_KEY-SECRET-7"),)
        )
    )
    request_id = _trailer(error, "x-request-id")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == f"internal error (request id {request_id})"
    out = capsys.readouterr().out
    # The details go to the log, with the request id, not to the caller; the key and
    # the request (a prompt) go nowhere, not even as a traceback's local variables.
    assert "secret internal detail" in out
    assert "KEY-SECRET" not in out and "PROMPT-TEXT" not in out
    (line,) = _rpc_lines(out)
    assert (line["status"], line["level"], line["request_id"]) == ("INTERNAL", "error", request_id)


async def test_invalid_argument_carries_a_bad_request_detail(channel: grpc.aio.Channel) -> None:
    error = await _fail(channel.unary_unary(_method("Invalid"), None, None)(b"x"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "prompt: must not be empty"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field == "prompt"


async def test_over_quota_says_which_and_when_to_retry(channel: grpc.aio.Channel) -> None:
    error = await _fail(channel.unary_unary(_method("Quota"), None, None)(b"x"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    quota, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(quota) and status.details[1].Unpack(retry)
    assert quota.violations[0].subject == "key:k1"
    assert retry.retry_delay.seconds == 3


async def test_undecodable_bytes_are_invalid_argument_not_unknown(
    channel: grpc.aio.Channel,
) -> None:
    error = await _fail(channel.unary_unary(_method("Typed"), None, None)(b"\xff\xff\xff"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("request: is not a valid message")
    ok = inference_pb2.GenerateRequest(prompt="fine").SerializeToString()
    assert await channel.unary_unary(_method("Typed"), None, None)(ok) == b"fine"


async def test_server_streaming_ok_and_failing_mid_stream(
    service: GrpcService, channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = channel.unary_stream(_method("Tokens"), None, None)
    assert [m async for m in tokens(b"abc")] == [b"a", b"b", b"c"]
    call = tokens(b"fail")
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for message in call:
            received.append(message)
    assert received == [b"f"]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "prompt: refused mid-stream"
    assert _trailer(error.value, "x-request-id")
    ok, failed = _rpc_lines(capsys.readouterr().out)
    assert (ok["status"], ok["prompt_tokens"], ok["completion_tokens"]) == ("OK", 3, 3)
    assert (failed["status"], failed["level"]) == ("INVALID_ARGUMENT", "warning")
    assert _count(service, "Tokens", "INVALID_ARGUMENT") >= 1


async def test_client_streaming_ok_and_refused(
    service: GrpcService, channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    upload = channel.stream_unary(_method("Upload"), None, None)
    call = upload(iter([b"a", b"b", b"c"]), metadata=(("x-request-id", "up-1"),))
    assert await call == b"abc"
    assert await _call_trailer(call, "x-request-id") == "up-1"
    error = await _fail(upload(iter([b"a", b"bad"])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "chunk: is bad"
    ok, refused = _rpc_lines(capsys.readouterr().out)
    assert (ok["request_id"], ok["status"]) == ("up-1", "OK")
    assert refused["status"] == "INVALID_ARGUMENT"
    assert _count(service, "Upload", "OK") >= 1


async def test_bidi_streaming_ok_and_a_bug(
    service: GrpcService, channel: grpc.aio.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    chat = channel.stream_stream(_method("Chat"), None, None)
    assert [m async for m in chat(iter([b"a", b"b"]))] == [b"A", b"B"]
    call = chat(iter([b"x", b"boom"]))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in call:
            pass
    request_id = _trailer(error.value, "x-request-id")
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert error.value.details() == f"internal error (request id {request_id})"
    ok, bug = _rpc_lines(capsys.readouterr().out)
    assert ok["status"] == "OK"
    assert (bug["status"], bug["request_id"]) == ("INTERNAL", request_id)
    assert _count(service, "Chat", "INTERNAL") >= 1


async def test_a_cancelled_stream_is_counted_as_cancelled(
    service: GrpcService, channel: grpc.aio.Channel
) -> None:
    before = _count(service, "Slow", "CANCELLED")
    call = channel.unary_stream(_method("Slow"), None, None)(b"a")
    assert await call.read() == b"a"
    call.cancel()
    for _ in range(100):  # the server notices the cancel asynchronously
        if _count(service, "Slow", "CANCELLED") > before:
            break
        await asyncio.sleep(0.02)
    assert _count(service, "Slow", "CANCELLED") == before + 1


async def test_a_taken_port_is_refused_at_start(service: GrpcService) -> None:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{service.port}"):
        build_server(
            ServiceSettings(port=service.port),
            [_binding()],
            name="second",
            metrics=ServiceMetrics("t2"),
        )


async def test_calls_cut_off_when_the_grace_runs_out_count_as_unavailable() -> None:
    service = build_server(
        ServiceSettings(drain_seconds=0, grace_seconds=0.3),
        [_binding()],
        name="graceful",
        metrics=ServiceMetrics("t"),
    )
    await service.start()
    async with grpc.aio.insecure_channel(service.address) as channel:
        call = channel.unary_stream(_method("Slow"), None, None)(b"a")
        assert await call.read() == b"a"
        await service.stop()  # the stream never ends by itself: grace runs out
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert _count(service, "Slow", "UNAVAILABLE") == 1
    assert _count(service, "Slow", "CANCELLED") == 0
