"""The quota gate over in-process counters: each quota refused with its subject and
retry-after, all-or-nothing reservations, settle and release accounting, and exact
sliding windows, on an injected clock."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from google.rpc import error_details_pb2
from tensorgate.inference.v1 import inference_pb2

from gateway.local_counters import InProcessCounters
from gateway.quota import Price, QuotaGate, QuotaReservation, UsageRecord
from services.runtime import access
from services.runtime.calls import Call, Limits, Principal, Usage
from services.runtime.errors import ResourceExhausted

# A Saturday, 12:00:30 UTC: half a minute past a minute boundary.
NOON = datetime(2024, 6, 15, 12, 0, 30, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Ledger:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)


NO_LIMITS = Limits()


def principal(
    key: Limits = NO_LIMITS,
    tenant: Limits = NO_LIMITS,
    cap: float = 0.0,
    spent: float = 0.0,
    month: str = "2024-06",  # NOON's
) -> Principal:
    return Principal(
        key_id="k1",
        tenant="acme",
        key_limits=key,
        tenant_limits=tenant,
        monthly_spend_cap=cap,
        month_spend=spent,
        spend_month=month,
    )


def call(who: Principal | None, deadline_s: float | None = None) -> Call:
    started = time.perf_counter()
    return Call(
        method="/tensorgate.gateway.v1.InferenceGateway/Generate",
        request_id="r1",
        started=started,
        deadline=None if deadline_s is None else started + deadline_s,
        peer="test",
        metadata=(),
        principal=who,
        # What the gateway's handler notes once it resolved the model.
        fields={"resolved": "tinylm:1"},
    )


def generate(prompt: str = "0123456789", max_tokens: int = 100) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="tinylm@production", prompt=prompt, max_tokens=max_tokens
    )


def infer() -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(model="digits:1")


def make_gate(
    clock: Clock, *, price: Price | None = None, ledger: Ledger | None = None
) -> QuotaGate:
    return QuotaGate(
        InProcessCounters(clock=clock), prices=lambda model: price, usage=ledger, clock=clock
    )


async def admit(
    gate: QuotaGate, who: Principal, request: object, deadline_s: float | None = None
) -> QuotaReservation:
    reservation = await gate.reserve(call(who, deadline_s), request)
    assert reservation is not None
    return reservation


async def refused(
    gate: QuotaGate, who: Principal, request: object, deadline_s: float | None = None
) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as caught:
        await gate.reserve(call(who, deadline_s), request)
    return caught.value


def test_the_gate_is_the_runtimes_quota_stage() -> None:
    gate: access.QuotaGate = make_gate(Clock())
    assert gate is not None


async def test_calls_without_a_principal_or_other_requests_are_not_metered() -> None:
    gate = make_gate(Clock())
    assert await gate.reserve(call(None), generate()) is None
    assert await gate.reserve(call(principal()), b"raw") is None
    assert await gate.reserve(call(principal()), None) is None


async def test_requests_per_minute_of_the_key() -> None:
    clock = Clock()
    gate, who = make_gate(clock), principal(key=Limits(requests_per_minute=3))
    for step in range(3):
        clock.now = NOON + step * 10
        await admit(gate, who, infer())
    clock.now = NOON + 25
    error = await refused(gate, who, infer())
    assert error.subject == "key:k1:requests_per_minute"
    # The first call (at NOON) ages out of the window at NOON + 60.
    assert error.retry_after_s == pytest.approx(35)
    assert "at its limit of 3 requests per minute" in error.message
    clock.now = NOON + 60
    await admit(gate, who, infer())


async def test_requests_per_minute_of_the_tenant() -> None:
    gate = make_gate(Clock())
    who = principal(key=Limits(requests_per_minute=10), tenant=Limits(requests_per_minute=1))
    await admit(gate, who, infer())
    error = await refused(gate, who, infer())
    assert error.subject == "tenant:acme:requests_per_minute"
    assert error.retry_after_s == pytest.approx(60)


async def test_the_minute_window_slides_across_a_minute_boundary() -> None:
    clock = Clock(NOON + 29.5)  # 12:00:59.5: just before the clock's minute turns
    gate, who = make_gate(clock), principal(key=Limits(requests_per_minute=100))
    for _ in range(100):
        await admit(gate, who, infer())
    # A fixed per-minute counter would start again at 12:01:00; the window does not.
    clock.now = NOON + 30.5
    error = await refused(gate, who, infer())
    assert error.retry_after_s == pytest.approx(59)
    clock.now = NOON + 89.499
    await refused(gate, who, infer())
    # 60 s after they were admitted, all 100 age out at once: exactly 100 more fit.
    clock.now = NOON + 89.5
    for _ in range(100):
        await admit(gate, who, infer())
    await refused(gate, who, infer())


async def test_tokens_per_minute_retry_after_is_when_enough_ages_out() -> None:
    clock = Clock()
    gate, who = make_gate(clock), principal(key=Limits(tokens_per_minute=300))
    await admit(gate, who, generate(max_tokens=90))  # 100 tokens at NOON
    clock.now = NOON + 10
    await admit(gate, who, generate(max_tokens=90))  # 100 at NOON + 10
    clock.now = NOON + 20
    # 200 in use; 250 more need 150 freed: both earlier calls must age out.
    error = await refused(gate, who, generate(max_tokens=240))
    assert error.subject == "key:k1:tokens_per_minute"
    assert error.retry_after_s == pytest.approx(50)
    assert "used 200 of its 300 tokens per minute" in error.message
    clock.now = NOON + 70
    await admit(gate, who, generate(max_tokens=240))


async def test_a_call_that_can_never_fit_is_told_not_to_retry() -> None:
    gate = make_gate(Clock())
    error = await refused(gate, principal(tenant=Limits(tokens_per_day=50)), generate())
    assert error.subject == "tenant:acme:tokens_per_day"
    assert error.retry_after_s == 0
    assert "lower max_tokens" in error.message


async def test_tokens_per_day_resets_at_utc_midnight() -> None:
    clock = Clock()
    gate, who = make_gate(clock), principal(key=Limits(tokens_per_day=250))
    await admit(gate, who, generate())
    await admit(gate, who, generate())
    error = await refused(gate, who, generate())
    assert error.subject == "key:k1:tokens_per_day"
    midnight = datetime(2024, 6, 16, tzinfo=UTC).timestamp()
    assert error.retry_after_s == pytest.approx(midnight - NOON)
    clock.now = midnight
    await admit(gate, who, generate())


async def test_concurrent_streams_are_given_back_when_calls_end() -> None:
    gate, who = make_gate(Clock()), principal(key=Limits(concurrent_streams=2))
    first = await admit(gate, who, generate())
    second = await admit(gate, who, generate())
    await admit(gate, who, infer())  # unary calls hold no stream
    error = await refused(gate, who, generate())
    assert error.subject == "key:k1:concurrent_streams"
    assert error.retry_after_s == 1.0
    await first.settle(Usage(10, 5))
    third = await admit(gate, who, generate())
    await second.release()
    await third.release()
    await admit(gate, who, generate())
    await admit(gate, who, generate())


async def test_the_spend_cap_is_seeded_from_the_ledger_and_resets_next_month() -> None:
    clock = Clock()
    price = Price(prompt_per_1k=1.0, completion_per_1k=2.0)
    gate = make_gate(clock, price=price)
    # Reserved: 10 prompt bytes * 0.001 + 100 * 0.002 = 0.21 per call.
    who = principal(cap=10.0, spent=9.5)
    await admit(gate, who, generate())
    await admit(gate, who, generate())
    error = await refused(gate, who, generate())
    assert error.subject == "tenant:acme:monthly_spend_cap"
    first_of_july = datetime(2024, 7, 1, tzinfo=UTC).timestamp()
    assert error.retry_after_s == pytest.approx(first_of_july - NOON)
    assert "9.92 of its monthly spend cap of 10.00" in error.message
    clock.now = first_of_july
    await admit(gate, principal(cap=10.0, spent=0.0, month="2024-07"), generate())


async def test_a_principal_cached_from_last_month_does_not_seed_this_months_spend() -> None:
    clock = Clock(datetime(2024, 7, 1, 0, 0, 5, tzinfo=UTC).timestamp())
    gate = make_gate(clock, price=Price(prompt_per_1k=1.0, completion_per_1k=2.0))
    # Authenticated in June with June's spend at the cap, and still cached in July.
    june = principal(cap=10.0, spent=10.0, month="2024-06")
    for _ in range(40):  # 40 * 0.21 = 8.4 of July's 10.0
        await admit(gate, june, generate())
    error = await refused(gate, june, generate(max_tokens=1000))
    assert "spent 8.40 of its monthly spend cap of 10.00" in error.message
    # June's answer in June still counts what June spent.
    await refused(make_gate(Clock(), price=Price(prompt_per_1k=1.0)), june, generate())


async def test_a_tenant_at_its_cap_is_refused_calls_priced_by_compute() -> None:
    price = Price(compute_per_second=0.5)
    gate = make_gate(Clock(), price=price)
    await admit(gate, principal(cap=10.0, spent=9.99), infer(), deadline_s=0.01)
    # (A new gate: the month's counter is seeded from the ledger only once.)
    error = await refused(
        make_gate(Clock(), price=price), principal(cap=10.0, spent=10.0), infer(), 0.01
    )
    assert error.subject == "tenant:acme:monthly_spend_cap"
    quota, retry = error.details()
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "tenant:acme:monthly_spend_cap"
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == int(error.retry_after_s * 1e9)


async def test_concurrent_calls_priced_by_compute_cannot_overrun_the_cap() -> None:
    # Each call may run until its deadline: its compute is reserved until then.
    price = Price(compute_per_second=0.5)
    gate = make_gate(Clock(), price=price)
    who = principal(cap=1.0)
    held = [await admit(gate, who, infer(), deadline_s=0.6) for _ in range(3)]  # 0.9
    error = await refused(gate, who, infer(), deadline_s=0.6)
    assert error.subject == "tenant:acme:monthly_spend_cap"
    assert error.retry_after_s > 0
    # Ending at once, they cost a few micro-units each: the cap frees up.
    for reservation in held:
        await reservation.settle(None)
    await admit(gate, who, infer(), deadline_s=1.9)
    # Without a deadline a call may run for the gateway's whole upstream timeout
    # (300 s, 150.0 of compute): it never fits a cap of 1.0, and is told why.
    error = await refused(gate, who, infer())
    assert error.retry_after_s == 0.0
    assert "set a shorter deadline" in error.message


async def test_a_refused_reservation_reserves_nothing() -> None:
    gate = make_gate(Clock())
    who = principal(
        key=Limits(requests_per_minute=3, tokens_per_minute=1000, tokens_per_day=1000),
        tenant=Limits(concurrent_streams=1),
    )
    await admit(gate, who, generate())  # 1 request, 110 tokens, the tenant's stream
    for _ in range(5):
        await refused(gate, who, generate())  # the tenant's stream is taken
    # None of the refused calls counted a request or a token.
    await admit(gate, who, infer())
    await admit(gate, who, infer())
    error = await refused(gate, who, infer())
    assert error.subject == "key:k1:requests_per_minute"


async def test_settle_counts_what_was_really_used() -> None:
    clock = Clock()
    gate = make_gate(clock)
    who = principal(key=Limits(tokens_per_minute=300, tokens_per_day=400))
    first = await admit(gate, who, generate())  # 110 reserved
    second = await admit(gate, who, generate())  # 220 reserved
    await refused(gate, who, generate())  # 330 > 300
    await first.settle(Usage(4, 6))  # 10 really used: 120 in the window
    await second.settle(Usage(4, 16))  # 20: 30
    await admit(gate, who, generate())  # 140
    await admit(gate, who, generate())  # 250
    # The day counted 10 + 20 + 110 + 110 = 250 of 400: a 160-token call does not fit.
    clock.now = NOON + 61
    error = await refused(gate, who, generate(max_tokens=150))
    assert error.subject == "key:k1:tokens_per_day"
    assert "used 250 of its 400" in error.message


async def test_release_gives_back_tokens_but_the_request_stays_counted() -> None:
    gate = make_gate(Clock())
    who = principal(key=Limits(requests_per_minute=3, tokens_per_minute=220))
    failed = await admit(gate, who, generate())
    await admit(gate, who, generate())
    await refused(gate, who, generate())  # tokens: 330 > 220
    await failed.release()
    await failed.release()  # twice: given back once
    await failed.settle(Usage(100, 100))  # after release: ignored
    await admit(gate, who, generate())
    error = await refused(gate, who, infer())
    assert error.subject == "key:k1:requests_per_minute"


async def test_a_cancelled_stream_counts_the_tokens_it_produced() -> None:
    ledger = Ledger()
    gate = make_gate(Clock(), price=Price(1.0, 2.0, 0.0), ledger=ledger)
    who = principal(key=Limits(tokens_per_minute=200))
    cancelled = call(who)
    reservation = await gate.reserve(cancelled, generate())
    assert reservation is not None
    cancelled.usage = Usage(10, 40)  # what the handler noted before the cancel
    await reservation.release()
    await admit(gate, who, generate())  # 50 + 110 fit in 200
    await refused(gate, who, generate())  # 270 do not
    (record,) = ledger.records
    assert (record.prompt_tokens, record.completion_tokens, record.errors) == (10, 40, 1)
    assert record.cost == pytest.approx(0.01 + 0.08)


async def test_settled_usage_goes_to_the_ledger_with_its_cost() -> None:
    clock, ledger = Clock(), Ledger()
    price = Price(prompt_per_1k=0.5, completion_per_1k=1.5, compute_per_second=0.01)
    gate = make_gate(clock, price=price, ledger=ledger)
    reservation = await admit(gate, principal(cap=100.0), generate())
    await reservation.settle(Usage(8, 20))
    await reservation.settle(Usage(8, 20))  # idempotent
    (record,) = ledger.records
    assert (record.tenant, record.key_id, record.model, record.day) == (
        "acme",
        "k1",
        "tinylm",
        "2024-06-15",
    )
    assert (record.requests, record.errors, record.prompt_tokens, record.completion_tokens) == (
        1,
        0,
        8,
        20,
    )
    assert record.compute_seconds > 0
    tokens_cost = 8 * 0.0005 + 20 * 0.0015
    assert record.cost == pytest.approx(tokens_cost + record.compute_seconds * 0.01, abs=2e-6)


async def test_the_spend_cap_counts_settled_cost() -> None:
    price = Price(prompt_per_1k=1.0, completion_per_1k=1.0)
    gate = make_gate(Clock(), price=price)
    who = principal(cap=0.3)
    first = await admit(gate, who, generate())  # 0.11 reserved
    await admit(gate, who, generate())  # 0.22
    await refused(gate, who, generate())  # 0.33 > 0.3
    await first.settle(Usage(5, 5))  # 0.01 really: 0.12
    await admit(gate, who, generate())  # 0.23


async def test_a_thousand_concurrent_calls_admit_exactly_the_limit() -> None:
    gate, who = make_gate(Clock()), principal(key=Limits(requests_per_minute=100))
    results = await asyncio.gather(
        *(gate.reserve(call(who), infer()) for _ in range(1000)), return_exceptions=True
    )
    assert sum(isinstance(result, QuotaReservation) for result in results) == 100
    assert all(isinstance(r, QuotaReservation | ResourceExhausted) for r in results)


async def test_stream_slots_of_calls_without_limits_cost_nothing() -> None:
    ledger = Ledger()
    gate = make_gate(Clock(), ledger=ledger)
    reservation = await admit(gate, principal(), generate())
    await reservation.settle(None)
    assert ledger.records[0].prompt_tokens == 0


async def test_idle_scopes_are_swept() -> None:
    clock = Clock()
    counters = InProcessCounters(clock=clock)
    gate = QuotaGate(counters, clock=clock)
    for n in range(50):
        who = Principal(key_id=f"k{n}", tenant="t", key_limits=Limits(requests_per_minute=5))
        await admit(gate, who, infer())
    assert len(counters._scopes) == 50
    clock.now = NOON + 121
    await admit(gate, principal(key=Limits(requests_per_minute=5)), infer())
    assert len(counters._scopes) == 1


async def test_a_key_counts_in_one_scope_across_sweeps_and_principal_objects() -> None:
    # The gate works out once per Principal object where its calls count; a sweep that
    # dropped the key's idle scope, or a fresh Principal for the same key (the auth
    # cache asked again), must still count in the one scope every other call sees.
    clock = Clock()
    gate = make_gate(clock)
    limits = Limits(requests_per_minute=2, concurrent_streams=1)
    first = principal(key=limits)
    await (await admit(gate, first, infer())).settle(None)
    clock.now = NOON + 121  # the window emptied: the next call sweeps the scope away
    await (await admit(gate, first, infer())).settle(None)
    again = replace(first)
    assert again is not first
    stream = await admit(gate, again, generate())
    assert (await refused(gate, first, infer())).subject == "key:k1:requests_per_minute"
    clock.now += 61
    assert (await refused(gate, first, generate())).subject == "key:k1:concurrent_streams"
    await stream.settle(Usage(1, 1))
    await (await admit(gate, first, generate())).settle(None)


async def test_a_call_that_never_resolved_its_model_is_booked_as_unresolved() -> None:
    clock, ledger = Clock(), Ledger()
    gate = make_gate(clock, ledger=ledger)
    unresolved = call(principal())
    unresolved.fields.clear()
    reservation = await gate.reserve(unresolved, generate())
    assert reservation is not None
    await reservation.release()
    (record,) = ledger.records
    assert (record.model, record.errors) == ("(unresolved)", 1)


async def test_a_rotated_key_shares_its_predecessors_counters() -> None:
    gate, limits = make_gate(Clock()), Limits(requests_per_minute=2, concurrent_streams=1)
    old = Principal(key_id="k1", tenant="acme", key_limits=limits, lineage_id="k1")
    new = Principal(key_id="k2", tenant="acme", key_limits=limits, lineage_id="k1")
    # During the grace period both keys work, but the pair has one key's limits.
    stream = await admit(gate, old, generate())
    error = await refused(gate, new, generate())
    assert error.subject == "key:k2:concurrent_streams"  # named as the caller knows it
    await stream.settle(Usage(10, 10))
    await admit(gate, new, generate())
    error = await refused(gate, old, infer())
    assert error.subject == "key:k1:requests_per_minute"
    # Another key of the tenant counts on its own.
    other = Principal(key_id="k3", tenant="acme", key_limits=limits, lineage_id="k3")
    await admit(gate, other, infer())


async def test_tokens_per_day_start_from_the_ledger_after_a_restart() -> None:
    clock = Clock()
    today = "2024-06-15"  # NOON's
    who = Principal(
        key_id="k2",
        tenant="acme",
        key_limits=Limits(tokens_per_day=1000),
        tenant_limits=Limits(tokens_per_day=5000),
        lineage_id="k1",
        lineage_day_tokens=900,
        tenant_day_tokens=4000,
        usage_day=today,
    )
    # A gateway that starts afresh starts the day's counters from what the ledger counted.
    error = await refused(make_gate(clock), who, generate())  # 110 more than 900 of 1000
    assert error.subject == "key:k2:tokens_per_day"
    assert "used 900 of its 1000" in error.message
    tenant_bound = replace(who, lineage_day_tokens=0, tenant_day_tokens=4950)
    error = await refused(make_gate(clock), tenant_bound, generate())
    assert error.subject == "tenant:acme:tokens_per_day"
    # Counters that exist already are not set back by an answer cached earlier.
    gate = make_gate(clock)
    await admit(gate, replace(who, lineage_day_tokens=0), generate())
    await admit(gate, replace(who, lineage_day_tokens=0), generate())
    error = await refused(gate, replace(who, lineage_day_tokens=0), generate(max_tokens=790))
    assert "used 220 of its 1000" in error.message
    # What the ledger said yesterday says nothing about today.
    await admit(make_gate(clock), replace(who, usage_day="2024-06-14"), generate())


async def test_a_day_limit_set_again_counts_what_was_used_while_it_was_off() -> None:
    # A limit of 0 counts nothing, so a day counter left from before the limit was
    # lifted missed what the key used meanwhile; the ledger did not, and the gateway
    # asks the auth service again when the limit is set back (a fresh Principal).
    clock, today = Clock(), "2024-06-15"  # NOON's
    gate = make_gate(clock)
    limited = Principal(
        key_id="k1", tenant="acme", key_limits=Limits(tokens_per_day=1000), usage_day=today
    )
    await (await admit(gate, limited, generate())).settle(Usage(10, 90))  # 100 counted
    lifted = replace(limited, key_limits=Limits())
    for _ in range(8):
        await (await admit(gate, lifted, generate())).settle(Usage(10, 90))
    again = replace(limited, lineage_day_tokens=900)  # the ledger: 900 today
    error = await refused(gate, again, generate())  # 900 + 110 > 1000
    assert error.subject == "key:k1:tokens_per_day"
    assert "used 900 of its 1000" in error.message


async def test_a_spend_cap_set_again_counts_what_was_spent_while_it_was_off() -> None:
    clock = Clock()
    gate = make_gate(clock, price=Price(prompt_per_1k=1.0, completion_per_1k=1.0))
    # 0.1 per call as settled, 0.11 reserved.
    await (await admit(gate, principal(cap=1.0), generate())).settle(Usage(10, 90))
    for _ in range(8):
        await (await admit(gate, principal(cap=0.0), generate())).settle(Usage(10, 90))
    error = await refused(gate, principal(cap=1.0, spent=0.9), generate())  # 0.9 + 0.11
    assert error.subject == "tenant:acme:monthly_spend_cap"
    assert "spent 0.90 of its monthly spend cap of 1.00" in error.message
