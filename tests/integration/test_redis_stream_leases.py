"""Stream slots in a real Redis are leases: renewed while the stream runs, lapsing within
a lease when their gateway dies, never brought back once given back, never held past
the call's own end. Leases of about a second here; Redis as in test_redis_counters.py."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from gateway.quota import QuotaGate
from gateway.redis_counters import RedisCounters
from services.runtime.calls import Limits, Usage
from services.runtime.errors import ResourceExhausted
from tests.integration.test_redis_counters import call, generate, principal
from tests.redis_servers import REDIS_URL, PrivateRedis

pytestmark = pytest.mark.integration

LEASE_S = 1.0
ONE_STREAM = principal(key=Limits(concurrent_streams=1))


def gateway(prefix: str, lease_s: float = LEASE_S) -> QuotaGate:
    return QuotaGate(RedisCounters(REDIS_URL, prefix=prefix, stream_lease_s=lease_s))


async def refused_until(gate: QuotaGate, seconds: float) -> None:
    """Asserts that `gate` admits no stream of ONE_STREAM for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with pytest.raises(ResourceExhausted):
            await gate.reserve(call(ONE_STREAM), generate())
        await asyncio.sleep(0.2)


async def admitted_within(gate: QuotaGate, seconds: float) -> float:
    """How long until `gate` admits a stream of ONE_STREAM (fails past `seconds`)."""
    started = time.monotonic()
    while True:
        try:
            reservation = await gate.reserve(call(ONE_STREAM), generate())
        except ResourceExhausted:
            assert time.monotonic() - started < seconds, "the slot was never freed"
            await asyncio.sleep(0.05)
            continue
        assert reservation is not None
        await reservation.release()
        return time.monotonic() - started


async def test_a_stream_outliving_its_lease_keeps_its_slot(prefix: str) -> None:
    running, other = gateway(prefix), gateway(prefix)
    try:
        stream = await running.reserve(call(ONE_STREAM), generate())
        assert stream is not None
        await refused_until(other, 3.5 * LEASE_S)  # renewed all along
        await stream.settle(Usage(1, 1))
        assert await admitted_within(other, 1.0) < 1.0
    finally:
        await running.close()
        await other.close()


async def test_a_dead_gateways_slot_frees_within_a_lease(prefix: str) -> None:
    dead = RedisCounters(REDIS_URL, prefix=prefix, stream_lease_s=LEASE_S)
    other = gateway(prefix)
    try:
        # A stream without a deadline (held up to the upstream timeout, 300 s); then the
        # gateway dies: nothing is settled and nothing renews.
        assert await QuotaGate(dead).reserve(call(ONE_STREAM), generate()) is not None
        await dead.leases.stop()
        with pytest.raises(ResourceExhausted):
            await other.reserve(call(ONE_STREAM), generate())
        assert await admitted_within(other, 2.5 * LEASE_S) <= 1.5 * LEASE_S
    finally:
        await dead.close()
        await other.close()


async def test_a_renewal_racing_a_settle_never_brings_the_slot_back(prefix: str) -> None:
    counters = RedisCounters(REDIS_URL, prefix=prefix, stream_lease_s=60.0)
    gate, other = QuotaGate(counters), gateway(prefix)
    try:
        for _ in range(20):
            held = await gate.reserve(call(ONE_STREAM), generate())
            assert held is not None
            # What a round that began before the settle sends: the lease it captured.
            captured = dict(counters.leases._held)
            assert len(captured) == 1
            await asyncio.gather(held.settle(Usage(1, 1)), counters.leases.renew())
            assert len(counters.leases) == 0  # left the renewal set at the settle
            counters.leases._held.update(captured)
            await counters.leases.renew()  # a renewal landing after the settle
            assert len(counters.leases) == 0  # told the slot is gone: not renewed again
            assert await admitted_within(other, 0.5) < 0.5  # the one slot is free
    finally:
        await gate.close()
        await other.close()


async def test_a_short_deadline_stream_still_frees_at_its_deadline(prefix: str) -> None:
    running, other = gateway(prefix), gateway(prefix)
    try:
        # The call may run 1.5 s: its slot is held until 2.5 s after, renewed past its
        # first lease (1 s) but never beyond that.
        assert await running.reserve(call(ONE_STREAM, deadline_s=1.5), generate()) is not None
        started = time.monotonic()
        await refused_until(other, 1.6)
        await admitted_within(other, 2.5)
        assert time.monotonic() - started < 3.3
    finally:
        await running.close()
        await other.close()


async def test_renewals_while_redis_is_away_log_once_and_go_on(
    private_redis: PrivateRedis,
) -> None:
    counters = RedisCounters(private_redis.url, stream_lease_s=0.3, recheck_s=0.1)
    gate = QuotaGate(counters)
    try:
        assert await gate.reserve(call(ONE_STREAM), generate()) is not None
        with capture_logs() as logs:
            private_redis.stop()
            await asyncio.sleep(0.5)  # several rounds fail
            private_redis.start()  # empty and without the script: loaded again
            await asyncio.sleep(0.4)
        assert [log["event"] for log in logs] == [
            "quota store unreachable",
            "quota store reachable again; counting in redis",
        ]
        # The lease lapsed meanwhile (a Redis restarted empty forgot it anyway): it is no
        # longer renewed, and the task that renews goes on.
        assert len(counters.leases) == 0
        assert counters.leases._task is not None and not counters.leases._task.done()
    finally:
        await gate.close()
