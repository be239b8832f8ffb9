"""Quota counters in a real Redis, shared by two gateways' stores: exact under
concurrency, all-or-nothing, and failing closed or open when Redis goes away.

Redis: TEST_REDIS_URL, else redis://127.0.0.1:6379/15; each test's keys live under a
prefix of its own, deleted after it. Without a Redis the tests skip saying why, except
on CI (CI=true), where they fail. Tests that stop Redis start a private redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs
from tensorgate.inference.v1 import inference_pb2

from gateway.counters import MICROS, Demand
from gateway.metrics import GatewayMetrics
from gateway.quota import Price, QuotaGate, QuotaReservation
from gateway.redis_counters import OVERLOADED, RedisCounters, parse_version
from services.runtime.calls import Call, Limits, Principal, Usage
from services.runtime.errors import ResourceExhausted, Unavailable
from services.runtime.process import free_port
from tests.redis_servers import PrivateRedis

pytestmark = pytest.mark.integration


@pytest.fixture
async def two_gateways(redis_url: str, prefix: str) -> AsyncIterator[tuple[QuotaGate, QuotaGate]]:
    price = Price(prompt_per_1k=0.1, completion_per_1k=0.1)
    # These tests count, they do not time: a round trip may take long on a busy machine
    # (1,000 reserves at once through 64 connections) without being an outage.
    gates = tuple(
        QuotaGate(
            RedisCounters(redis_url, prefix=prefix, timeout_s=5.0), prices=lambda model: price
        )
        for _ in range(2)
    )
    yield gates[0], gates[1]
    for gate in gates:
        await gate.close()


NO_LIMITS = Limits()


def principal(key: Limits = NO_LIMITS, tenant: Limits = NO_LIMITS, cap: float = 0.0) -> Principal:
    return Principal(
        key_id="k1", tenant="acme", key_limits=key, tenant_limits=tenant, monthly_spend_cap=cap
    )


def call(who: Principal, deadline_s: float | None = None) -> Call:
    started = time.perf_counter()
    return Call(
        method="/tensorgate.gateway.v1.InferenceGateway/Generate",
        request_id="r1",
        started=started,
        deadline=None if deadline_s is None else started + deadline_s,
        peer="test",
        metadata=(),
        principal=who,
    )


def generate(max_tokens: int = 100) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model="tinylm", prompt="0123456789", max_tokens=max_tokens)


def infer() -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(model="digits")


async def attempt(
    gates: tuple[QuotaGate, ...], who: Principal, count: int, request: Any
) -> list[Any]:
    """`count` reservations at once, spread over `gates`."""
    return await asyncio.gather(
        *(gates[n % len(gates)].reserve(call(who), request) for n in range(count)),
        return_exceptions=True,
    )


def admitted(results: list[Any]) -> list[QuotaReservation]:
    unexpected = [r for r in results if not isinstance(r, QuotaReservation | ResourceExhausted)]
    assert not unexpected, unexpected
    return [r for r in results if isinstance(r, QuotaReservation)]


async def test_two_gateways_admit_exactly_the_requests_per_minute(
    two_gateways: tuple[QuotaGate, QuotaGate],
) -> None:
    who = principal(key=Limits(requests_per_minute=100))
    results = await attempt(two_gateways, who, 1000, infer())
    assert len(admitted(results)) == 100
    subjects = {r.subject for r in results if isinstance(r, ResourceExhausted)}
    assert subjects == {"key:k1:requests_per_minute"}
    assert all(0 < r.retry_after_s <= 60 for r in results if isinstance(r, ResourceExhausted))


async def test_concurrent_streams_across_gateways(
    two_gateways: tuple[QuotaGate, QuotaGate],
) -> None:
    who = principal(tenant=Limits(concurrent_streams=3))
    results = await attempt(two_gateways, who, 10, generate())
    running = admitted(results)
    assert len(running) == 3
    refusals = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(refusals) == 7
    assert {(r.subject, r.retry_after_s) for r in refusals} == {
        ("tenant:acme:concurrent_streams", 1.0)
    }
    for reservation in running:
        await reservation.settle(Usage(10, 20))
    assert len(admitted(await attempt(two_gateways, who, 10, generate()))) == 3


async def test_the_spend_cap_is_never_overrun(
    two_gateways: tuple[QuotaGate, QuotaGate], redis_url: str, prefix: str
) -> None:
    # Each call may cost (10 + 100) tokens * 0.0001 = 0.011: 90 fit in 1.00.
    who = principal(cap=1.0)
    results = await attempt(two_gateways, who, 200, generate())
    running = admitted(results)
    assert len(running) == 90
    assert {r.subject for r in results if isinstance(r, ResourceExhausted)} == {
        "tenant:acme:monthly_spend_cap"
    }
    month = datetime.now(UTC).strftime("%Y-%m")
    client = Redis.from_url(redis_url)
    try:
        key = f"{prefix}{{acme}}:spend:{month}"
        assert int(await client.get(key) or 0) == 90 * 11_000 <= MICROS
        for reservation in running:
            await reservation.settle(Usage(10, 40))  # 0.005 each
        assert int(await client.get(key) or 0) == 90 * 5_000
        assert await client.ttl(key) > 0
    finally:
        await client.aclose()


async def test_settle_and_release_in_redis(two_gateways: tuple[QuotaGate, QuotaGate]) -> None:
    first, second = two_gateways
    who = principal(key=Limits(requests_per_minute=4, tokens_per_minute=300, tokens_per_day=400))
    a = await first.reserve(call(who), generate())  # 110 reserved
    b = await second.reserve(call(who), generate())  # 220
    assert a is not None and b is not None
    with pytest.raises(ResourceExhausted) as over:
        await first.reserve(call(who), generate())
    assert over.value.subject == "key:k1:tokens_per_minute"
    assert 59 < over.value.retry_after_s <= 60
    await a.settle(Usage(4, 6))  # 10 really used: 120
    await b.release()  # nothing used: 10, and b's request still counts
    await b.release()
    c = await second.reserve(call(who), generate())  # 120 in the window, 130 today
    assert c is not None
    await first.reserve(call(who), infer())  # the 4th request of the minute
    with pytest.raises(ResourceExhausted) as over:
        await second.reserve(call(who), infer())
    assert over.value.subject == "key:k1:requests_per_minute"
    await c.settle(Usage(10, 290))  # 300 really used: 310 today
    with pytest.raises(ResourceExhausted) as over:
        await first.reserve(call(principal(key=Limits(tokens_per_day=400))), generate())
    assert over.value.subject == "key:k1:tokens_per_day"
    assert "used 310 of its 400" in over.value.message


async def test_every_counter_expires_by_itself(
    two_gateways: tuple[QuotaGate, QuotaGate], redis_url: str, prefix: str
) -> None:
    limits = Limits(
        requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=1000, concurrent_streams=2
    )
    await two_gateways[0].reserve(call(principal(limits, limits, cap=5.0), 30.0), generate())
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        assert len(keys) == 10  # the 9 counters and the reservation's marker
        for key in keys:
            assert await client.ttl(key) > 0, key
    finally:
        await client.aclose()


async def test_a_stream_slot_never_given_back_expires_after_the_deadline(
    two_gateways: tuple[QuotaGate, QuotaGate],
) -> None:
    gate, who = two_gateways[0], principal(key=Limits(concurrent_streams=1))
    # Reserved and never settled, as by a gateway that died: held until 1 s past the
    # call's deadline.
    await gate.reserve(call(who, deadline_s=0.2), generate())
    with pytest.raises(ResourceExhausted):
        await gate.reserve(call(who), generate())
    await asyncio.sleep(1.4)
    assert await gate.reserve(call(who), generate()) is not None


async def test_redis_unreachable_fails_closed() -> None:
    gate = QuotaGate(RedisCounters(f"redis://127.0.0.1:{free_port()}/0"))
    try:
        started = time.monotonic()
        with capture_logs() as logs, pytest.raises(Unavailable) as error:
            await gate.reserve(call(principal(key=Limits(requests_per_minute=5))), infer())
        assert error.value.message == "quota store unreachable; retry shortly"
        with capture_logs() as again, pytest.raises(Unavailable):
            await gate.reserve(call(principal(key=Limits(requests_per_minute=5))), infer())
        assert time.monotonic() - started < 1.0
        assert [log["event"] for log in logs] == ["quota store unreachable"]
        assert again == []
    finally:
        await gate.close()


async def test_redis_unreachable_fails_open_counting_locally() -> None:
    gate = QuotaGate(RedisCounters(f"redis://127.0.0.1:{free_port()}/0", fail_open=True))
    who = principal(key=Limits(requests_per_minute=2))
    try:
        with capture_logs() as logs:
            assert await gate.reserve(call(who), infer()) is not None
            assert await gate.reserve(call(who), infer()) is not None
            with pytest.raises(ResourceExhausted) as over:
                await gate.reserve(call(who), infer())
        assert over.value.subject == "key:k1:requests_per_minute"
        assert [log["event"] for log in logs] == ["quota store unreachable"]
    finally:
        await gate.close()


@pytest.mark.parametrize("fail_open", [False, True])
async def test_redis_going_away_and_coming_back(
    private_redis: PrivateRedis, fail_open: bool
) -> None:
    metrics = GatewayMetrics()
    counters = RedisCounters(
        private_redis.url,
        fail_open=fail_open,
        recheck_s=0.2,
        on_lost=metrics.quota_give_backs_lost.inc,
    )
    gate, who = QuotaGate(counters), principal(key=Limits(concurrent_streams=1))
    try:
        held = await gate.reserve(call(who), generate())
        assert held is not None
        private_redis.stop()
        with capture_logs() as logs:
            if fail_open:
                local = await gate.reserve(call(who), generate())  # counted here
                assert local is not None
                with pytest.raises(ResourceExhausted):
                    await gate.reserve(call(who), generate())
                await local.settle(Usage(1, 1))
            else:
                with pytest.raises(Unavailable):
                    await gate.reserve(call(who), generate())
            await held.settle(Usage(1, 1))  # not raised; tried again in the background
            await counters.given_back()
            assert counters.lost_settlements == 1
            lost = metrics.registry.get_sample_value("tensorgate_quota_give_backs_lost_total")
            assert lost == 1
            private_redis.start()  # empty, and without the scripts: NOSCRIPT, loaded again
            await asyncio.sleep(0.25)
            assert await gate.reserve(call(who), generate()) is not None
            with pytest.raises(ResourceExhausted):
                await gate.reserve(call(who), generate())  # in Redis again
        assert [log["event"] for log in logs] == [
            "quota store unreachable",
            "quota give-backs lost; what they held stays reserved until it expires",
            "quota store reachable again; counting in redis",
        ]
        assert logs[1]["lost_total"] == 1
    finally:
        await gate.close()


async def test_a_reserve_cancelled_mid_round_trip_gives_its_stream_slot_back(
    two_gateways: tuple[QuotaGate, QuotaGate],
) -> None:
    gate = two_gateways[0]
    who = principal(key=Limits(concurrent_streams=3))
    # Callers that go away while their reservation's script runs in Redis, at many points
    # of the round trip: whatever the script reserved for them is given back.
    for delay_us in range(0, 3000, 60):
        reserving = asyncio.ensure_future(gate.reserve(call(who), generate()))
        await asyncio.sleep(delay_us / 1e6)
        if reserving.done():
            reservation = reserving.result()
            assert reservation is not None
            await reservation.release()
        else:
            reserving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reserving
    # The give-backs run once their scripts have answered: on a busy machine that takes
    # a while, so the 3 slots are waited for (never more than 3 may be admitted).
    deadline = time.monotonic() + 10
    while True:
        got = admitted(await attempt(two_gateways, who, 10, generate()))
        assert len(got) <= 3
        if len(got) == 3 or time.monotonic() > deadline:
            break
        for reservation in got:
            await reservation.release()
        await asyncio.sleep(0.1)
    assert len(got) == 3


def _day_key(prefix: str, scope: str) -> str:
    return f"{prefix}{{acme}}:{scope}d:{datetime.now(UTC).strftime('%Y-%m-%d')}"


async def test_a_reserve_that_timed_out_and_landed_later_is_given_back_once(
    private_redis: PrivateRedis,
) -> None:
    counters = RedisCounters(private_redis.url, timeout_s=0.2, recheck_s=0.3)
    gate = QuotaGate(counters)
    who = principal(key=Limits(concurrent_streams=1, tokens_per_day=1000))
    client = Redis.from_url(private_redis.url)
    try:
        first = await gate.reserve(call(who), generate())  # the script loaded, warm
        assert first is not None
        await first.settle(Usage(10, 5))
        # Redis stops answering (a stall, not a crash): the reserve times out with its
        # script sent, and the script runs once Redis goes on. Whether its give-back
        # runs before or after it, the slot and the day's tokens end up given back.
        os.kill(private_redis.process_id, signal.SIGSTOP)
        try:
            with pytest.raises(Unavailable):
                await gate.reserve(call(who), generate())
            await asyncio.sleep(0.1)
        finally:
            os.kill(private_redis.process_id, signal.SIGCONT)
        await counters.given_back()
        assert counters.lost_settlements == 0
        await asyncio.sleep(0.35)  # past recheck_s: Redis is asked again
        again = await gate.reserve(call(who), generate())  # the only stream slot is free
        assert again is not None
        assert int(await client.get(_day_key("tg:quota:", "key:k1:")) or 0) == 15 + 110
    finally:
        await client.aclose()
        await gate.close()


async def test_a_give_back_that_runs_before_its_reservation_leaves_nothing_held(
    redis_url: str, prefix: str
) -> None:
    counters = RedisCounters(redis_url, prefix=prefix)
    demand = Demand("k1", "acme", Limits(concurrent_streams=1), NO_LIMITS, 110, 30.0, 30.0)
    try:
        # The give-back of a reservation whose answer never came, run before the
        # reservation's script (stuck behind a slow command on another connection):
        # simulated by the "0" marker it leaves for the next reservation id.
        rid = f"{counters._rid_prefix}{1:x}"
        client = Redis.from_url(redis_url)
        await client.set(f"{prefix}{{acme}}:r:{rid}", "0", px=60_000)
        await client.aclose()
        with pytest.raises(Unavailable):
            await counters.reserve(demand)  # reserved nothing: the marker said so
        assert await counters.reserve(demand) is not None  # so the one slot was free
        with pytest.raises(ResourceExhausted):
            await counters.reserve(demand)
    finally:
        await counters.close()


async def test_a_reservation_that_landed_after_its_caller_gave_up_leaves_the_window(
    redis_url: str, prefix: str
) -> None:
    counters = RedisCounters(redis_url, prefix=prefix)
    demand = Demand("k1", "acme", Limits(requests_per_minute=1), NO_LIMITS, tokens=10)
    try:
        # A reserve whose answer never came (a timeout) but whose script ran: the gateway
        # refused its caller and gives it back not knowing it landed. That request was
        # never admitted, so the key's one request a minute is still free.
        late = await counters.reserve(demand)
        late.landed = False  # type: ignore[attr-defined]  # as after a timed-out answer
        await late.settle(0, 0)
        assert await counters.reserve(demand) is not None
        with pytest.raises(ResourceExhausted):
            await counters.reserve(demand)
    finally:
        await counters.close()


async def test_a_settle_sent_again_counts_once(redis_url: str, prefix: str) -> None:
    counters = RedisCounters(redis_url, prefix=prefix)
    demand = Demand("k1", "acme", Limits(tokens_per_day=1000), NO_LIMITS, tokens=110)
    client = Redis.from_url(redis_url)
    try:
        hold = await counters.reserve(demand)
        assert int(await client.get(_day_key(prefix, "key:k1:")) or 0) == 110
        # A settle whose answer timed out is sent again: it counts once.
        args = hold.settle_args(15, 0)  # type: ignore[attr-defined]
        await counters.run_settle(hold.keys, args)  # type: ignore[attr-defined]
        await counters.run_settle(hold.keys, args)  # type: ignore[attr-defined]
        assert int(await client.get(_day_key(prefix, "key:k1:")) or 0) == 15
    finally:
        await client.aclose()
        await counters.close()


_BUSY = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


async def test_a_full_connection_pool_is_overload_not_an_outage(
    private_redis: PrivateRedis,
) -> None:
    counters = RedisCounters(
        private_redis.url, timeout_s=5.0, max_connections=1, pool_timeout_s=0.05
    )
    gate, who = QuotaGate(counters), principal(key=Limits(requests_per_minute=100))
    client = Redis.from_url(private_redis.url)
    try:
        assert await gate.reserve(call(who), infer()) is not None  # the pool's connection
        # Redis is busy with a slow script; the one connection waits on it, so the
        # next call finds the pool full.
        busy = asyncio.ensure_future(client.eval(_BUSY, 0, 600_000))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(gate.reserve(call(who), infer()))
        await asyncio.sleep(0.1)
        with capture_logs() as logs, pytest.raises(ResourceExhausted) as over:
            await gate.reserve(call(who), infer())
        assert over.value.subject == OVERLOADED
        assert over.value.retry_after_s > 0
        assert "too many quota checks" in over.value.message
        await busy
        assert await waiting is not None
        # Redis was never taken for down: the next call goes to it at once.
        assert await gate.reserve(call(who), infer()) is not None
        assert logs == []
    finally:
        await client.aclose()
        await gate.close()


@pytest.mark.parametrize("fail_open", [False, True])
async def test_a_full_pool_while_redis_hangs_is_the_outage_not_overload(
    private_redis: PrivateRedis, fail_open: bool
) -> None:
    counters = RedisCounters(
        private_redis.url,
        fail_open=fail_open,
        timeout_s=0.3,
        max_connections=1,
        pool_timeout_s=0.05,
        recheck_s=0.2,
    )
    gate, who = QuotaGate(counters), principal(key=Limits(requests_per_minute=100))
    try:
        assert await gate.reserve(call(who), infer()) is not None  # warm
        os.kill(private_redis.process_id, signal.SIGSTOP)  # hung: accepts, never answers
        try:
            with capture_logs():
                if fail_open:
                    assert await gate.reserve(call(who), infer()) is not None
                else:
                    with pytest.raises(Unavailable):
                        await gate.reserve(call(who), infer())  # timed out: marked down
                await asyncio.sleep(0.25)  # past recheck_s: Redis is asked again
                # The first takes the one connection and waits on Redis; the second
                # finds the pool full, because Redis hangs: the outage's answer.
                results = await asyncio.gather(
                    gate.reserve(call(who), infer()),
                    gate.reserve(call(who), infer()),
                    return_exceptions=True,
                )
        finally:
            os.kill(private_redis.process_id, signal.SIGCONT)
        if fail_open:
            assert all(isinstance(r, QuotaReservation) for r in results), results
        else:
            assert all(isinstance(r, Unavailable) for r in results), results
    finally:
        await gate.close()


async def test_redis_7_or_newer_is_required_at_start(redis_url: str) -> None:
    counters = RedisCounters(redis_url)
    try:
        await counters.check_server()  # the Redis here is 7.x
    finally:
        await counters.close()
    assert parse_version("7.0.15") >= (7, 0) > parse_version("6.2.14")
    assert parse_version("8.0-rc1") >= (7, 0)


async def test_an_older_redis_fails_the_start_saying_what_to_do() -> None:
    # No Redis 6 is installed here: a server that speaks RESP answers as one would.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if not line.startswith(b"*"):
                continue
            parts = []
            for _ in range(int(line[1:])):
                await reader.readline()
                parts.append((await reader.readline()).strip().upper())
            if parts[0] == b"INFO":
                body = b"# Server\r\nredis_version:6.2.14\r\n"
                writer.write(b"$%d\r\n%s\r\n" % (len(body), body))
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    counters = RedisCounters(f"redis://127.0.0.1:{port}/0")
    try:
        with pytest.raises(RuntimeError) as error:
            await counters.check_server()
        assert "Redis 6.2.14" in str(error.value)
        assert "Redis 7.0 or newer" in str(error.value)
    finally:
        await counters.close()
        server.close()
        await server.wait_closed()


async def test_a_rotated_key_and_its_successor_share_counters_in_redis(
    two_gateways: tuple[QuotaGate, QuotaGate],
) -> None:
    limits = Limits(requests_per_minute=3)
    old = Principal(key_id="k1", tenant="acme", key_limits=limits, lineage_id="k1")
    new = Principal(key_id="k2", tenant="acme", key_limits=limits, lineage_id="k1")
    assert len(admitted(await attempt(two_gateways, old, 2, infer()))) == 2
    results = await attempt(two_gateways, new, 3, infer())
    assert len(admitted(results)) == 1
    assert {r.subject for r in results if isinstance(r, ResourceExhausted)} == {
        "key:k2:requests_per_minute"
    }


async def test_day_counters_start_from_the_ledger_in_redis(
    two_gateways: tuple[QuotaGate, QuotaGate], redis_url: str, prefix: str
) -> None:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    who = Principal(
        key_id="k2",
        tenant="acme",
        key_limits=Limits(tokens_per_day=1000),
        lineage_id="k1",
        lineage_day_tokens=800,
        usage_day=today,
    )
    first, second = two_gateways
    assert await first.reserve(call(who), generate()) is not None  # 800 + 110
    # Once the counter exists, it is the count: a later answer does not set it back.
    with pytest.raises(ResourceExhausted) as over:
        await second.reserve(call(replace(who, lineage_day_tokens=0)), generate())
    assert over.value.subject == "key:k2:tokens_per_day"
    assert "used 910 of its 1000" in over.value.message
    client = Redis.from_url(redis_url)
    try:
        assert int(await client.get(_day_key(prefix, "key:k1:")) or 0) == 910
    finally:
        await client.aclose()


async def test_a_day_limit_and_a_spend_cap_set_again_count_what_was_used_while_off(
    two_gateways: tuple[QuotaGate, QuotaGate],
) -> None:
    # A limit of 0 counts nothing, so counters left from before a limit was lifted
    # missed what was used meanwhile; the ledger did not (the Principal's seeds).
    today, month = datetime.now(UTC).strftime("%Y-%m-%d"), datetime.now(UTC).strftime("%Y-%m")
    first, second = two_gateways
    limited = Principal(
        key_id="k1",
        tenant="acme",
        key_limits=Limits(tokens_per_day=1000),
        monthly_spend_cap=1.0,
        usage_day=today,
        spend_month=month,
    )
    held = await first.reserve(call(limited), generate())  # 110 tokens, 0.011
    assert held is not None
    await held.settle(Usage(10, 90))  # 100 tokens, 0.01
    lifted = replace(limited, key_limits=Limits(), monthly_spend_cap=0.0)
    for _ in range(8):
        held = await second.reserve(call(lifted), generate())
        assert held is not None
        await held.settle(Usage(10, 90))
    day_again = replace(limited, lineage_day_tokens=900, monthly_spend_cap=0.0)
    with pytest.raises(ResourceExhausted) as over:
        await first.reserve(call(day_again), generate())  # 900 + 110 > 1000
    assert over.value.subject == "key:k1:tokens_per_day"
    assert "used 900 of its 1000" in over.value.message
    # Each call as settled costs 0.01: 0.09 this month.
    cap_again = replace(limited, key_limits=Limits(), monthly_spend_cap=0.1, month_spend=0.09)
    with pytest.raises(ResourceExhausted) as over:
        await second.reserve(call(cap_again), generate())  # 0.09 + 0.011 > 0.1
    assert over.value.subject == "tenant:acme:monthly_spend_cap"
    assert "spent 0.09 of" in over.value.message


class _StalledOnce:
    """A settle script whose first round trip never answers (Redis stalled, or a caller
    cut off while it waits), then the real one."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        self.calls += 1
        if self.calls == 1:
            await asyncio.Event().wait()
        return await self.real(keys, args)


class _FailingOnce(_StalledOnce):
    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RedisConnectionError("Connection closed by server.")
        return await self.real(keys, args)


async def test_a_settle_cut_off_mid_round_trip_is_still_given_back(
    redis_url: str, prefix: str
) -> None:
    counters = RedisCounters(redis_url, prefix=prefix, recheck_s=0.1)
    gate, who = QuotaGate(counters), principal(key=Limits(concurrent_streams=1))
    try:
        held = await gate.reserve(call(who), generate())
        assert held is not None
        counters._settle = _StalledOnce(counters._settle)  # type: ignore[assignment]
        # The call's settle is cut off while it waits (a stopping server cancels the
        # handlers left): what the call holds is owed back all the same.
        settling = asyncio.ensure_future(held.settle(Usage(1, 1)))
        await asyncio.sleep(0.05)
        settling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settling
        await counters.given_back()
        assert await gate.reserve(call(who), generate()) is not None  # the one slot
    finally:
        await gate.close()


async def test_give_backs_still_owed_when_the_gateway_stops_are_given_back(
    redis_url: str, prefix: str
) -> None:
    counters = RedisCounters(redis_url, prefix=prefix, recheck_s=0.1)
    who = principal(key=Limits(concurrent_streams=1))
    gate = QuotaGate(counters)
    held = await gate.reserve(call(who), generate())
    assert held is not None
    counters._settle = _FailingOnce(counters._settle)  # type: ignore[assignment]
    await held.settle(Usage(1, 1))  # failed: to be tried again in the background
    await gate.close()  # the gateway stops before that
    after = QuotaGate(RedisCounters(redis_url, prefix=prefix))
    try:
        assert await after.reserve(call(who), generate()) is not None  # the one slot
    finally:
        await after.close()
