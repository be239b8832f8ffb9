"""The pipeline's authentication and quota stages, in order, on a real in-process server.

The auth/quota service plugs its own stages in later; these tests use small
recording stages to pin down the contract every stage implementation relies on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.runtime import calls
from services.runtime.calls import Call, Principal, Usage
from services.runtime.errors import ResourceExhausted, Unauthenticated
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import GrpcService, ServiceBinding, build_server
from services.runtime.settings import ServiceSettings

SERVICE = "test.Staged"


class RecordingAuthenticator:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def authenticate(self, call: Call) -> Principal | None:
        key = call.metadata_value("authorization")
        self.events.append("authenticate")
        if key != "Bearer good":
            raise Unauthenticated("a valid API key is required")
        return Principal(key_id="k1", tenant="acme")


class RecordingReservation:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def settle(self, usage: Usage | None) -> None:
        self.events.append(f"settle {usage}")

    async def release(self) -> None:
        self.events.append("release")


class RecordingQuota:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def reserve(self, call: Call, request: Any) -> RecordingReservation | None:
        assert call.principal is not None, "quota runs after authentication"
        self.events.append(f"reserve {call.principal.key_id} {request!r}")
        if request == b"too much":
            raise ResourceExhausted("requests per minute exceeded", subject="key:k1")
        return RecordingReservation(self.events)


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield request
    if request == b"fail":
        raise RuntimeError("bug")
    calls.note_usage(prompt_tokens=2, completion_tokens=5)


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"".join([r async for r in requests])


@pytest.fixture(scope="module")
def events() -> list[str]:
    return []


@pytest.fixture(scope="module")
async def service(events: list[str]) -> AsyncIterator[GrpcService]:
    binding = ServiceBinding(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
            "Upload": grpc.stream_unary_rpc_method_handler(_upload),
        },
    )
    running = build_server(
        ServiceSettings(drain_seconds=0, grace_seconds=0),
        [binding],
        name="staged",
        metrics=ServiceMetrics("s"),
        authenticator=RecordingAuthenticator(events),
        quota=RecordingQuota(events),
    )
    await running.start()
    yield running
    await running.stop()


async def _collect(service: GrpcService, request: bytes, key: str) -> list[bytes]:
    async with grpc.aio.insecure_channel(service.address) as channel:
        call = channel.unary_stream(f"/{SERVICE}/Stream", None, None)(
            request, metadata=(("authorization", f"Bearer {key}"),)
        )
        return [message async for message in call]


async def test_stages_run_in_order_and_settle_what_was_used(
    service: GrpcService, events: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    events.clear()
    assert await _collect(service, b"hi", "good") == [b"hi"]
    assert events == [
        "authenticate",
        "reserve k1 b'hi'",
        "settle Usage(prompt_tokens=2, completion_tokens=5)",
    ]
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["key_id"], line["tenant"], line["completion_tokens"]) == ("k1", "acme", 5)
    assert "good" not in json.dumps(line)  # the key itself is never logged


async def test_a_refused_key_never_reaches_quota_or_the_handler(
    service: GrpcService, events: list[str]
) -> None:
    events.clear()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _collect(service, b"hi", "bad")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert events == ["authenticate"]


async def test_over_quota_is_refused_before_the_handler(
    service: GrpcService, events: list[str]
) -> None:
    events.clear()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _collect(service, b"too much", "good")
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert events == ["authenticate", "reserve k1 b'too much'"]


async def test_a_failed_call_releases_its_reservation(
    service: GrpcService, events: list[str]
) -> None:
    events.clear()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _collect(service, b"fail", "good")
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert events == ["authenticate", "reserve k1 b'fail'", "release"]


async def test_client_streaming_reserves_before_its_requests_arrive(
    service: GrpcService, events: list[str]
) -> None:
    events.clear()
    async with grpc.aio.insecure_channel(service.address) as channel:
        upload = channel.stream_unary(f"/{SERVICE}/Upload", None, None)
        reply = await upload(iter([b"a", b"b"]), metadata=(("authorization", "Bearer good"),))
    assert reply == b"ab"
    assert events == ["authenticate", "reserve k1 None", "settle None"]


async def _never_sent() -> AsyncIterator[bytes]:
    # A request that never arrives: the caller holds its message back.
    await asyncio.Event().wait()
    yield b"unreachable"


@pytest.mark.parametrize("method", ["Echo", "Stream"])
async def test_a_unary_request_is_not_read_before_the_key_is_accepted(
    service: GrpcService, events: list[str], method: str
) -> None:
    # A keyless caller must not make the service take in a request of up to the message
    # limit: the refusal comes before the request message has even been sent.
    events.clear()
    async with grpc.aio.insecure_channel(service.address) as channel:
        if method == "Echo":
            call: Any = channel.stream_unary(f"/{SERVICE}/{method}", None, None)(
                _never_sent(), timeout=20
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
        else:
            call = channel.stream_stream(f"/{SERVICE}/{method}", None, None)(
                _never_sent(), timeout=20
            )
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call.read()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert events == ["authenticate"]


async def test_a_unary_method_still_takes_one_request_from_a_unary_caller(
    service: GrpcService, events: list[str]
) -> None:
    events.clear()
    async with grpc.aio.insecure_channel(service.address) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", None, None)
        assert await echo(b"x" * 100_000, metadata=(("authorization", "Bearer good"),)) == (
            b"x" * 100_000
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await echo(b"x", metadata=(("authorization", "Bearer bad"),))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert events[0] == "authenticate" and events[1].startswith("reserve k1")


async def test_a_unary_method_called_without_its_request_is_invalid_argument(
    service: GrpcService,
) -> None:
    async with grpc.aio.insecure_channel(service.address) as channel:
        call = channel.stream_unary(f"/{SERVICE}/Echo", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(iter([]), metadata=(("authorization", "Bearer good"),), timeout=20)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "takes one request message" in (error.value.details() or "")
