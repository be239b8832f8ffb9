"""The gateway's quota stage: what a Generate or Infer call may use is reserved before it
is forwarded, and settled with what it really used when it ends.

First, the key must be allowed the model the request names (`admits`, the gateway's
model-scope check: PERMISSION_DENIED before anything is reserved). A reservation is one
request, an upper bound of the call's tokens and, for Generate, one stream slot, per key
and per tenant (services.runtime.calls.Limits), and its cost against the tenant's
monthly spend cap. A key's counters are its lineage's (a rotated key counts in its
predecessor's), and the day's tokens and the month's spend start from what the ledger
counted when a counter starts empty (a restart), as the Principal carries them. All of
it is reserved in one atomic step of the counter store (local_counters.py in process,
redis_counters.py across replicas), or none of it.

Tokens: the prompt's bound is its length in UTF-8 bytes (byte-level tokenizers use one
token per byte and BPE fewer), plus max_tokens. Cost: at reserve, the per-model `Price`
of those tokens plus compute for as long as the call may run (its deadline, or the
gateway's upstream timeout when it set none); at settle, the price of the tokens really
used plus the call's real duration. So concurrent calls cannot take a tenant past its
spend cap, and a caller priced by compute gets more calls under its cap by setting
shorter deadlines.

When a call ends, its usage goes to a `UsageSink` (the auth service's ledger).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from tensorgate.inference.v1 import inference_pb2

from gateway.counters import (
    MICROS,
    CounterHold,
    CounterStore,
    Demand,
    UtcCalendar,
    check_fits,
    is_limited,
)
from gateway.local_counters import InProcessCounters, LocalHold, LocalPlan
from services.runtime.calls import Call, Principal, Usage

_GENERATE = inference_pb2.GenerateRequest
_INFER = inference_pb2.InferRequest


@dataclass(frozen=True, slots=True)
class Price:
    """What a model's use costs, in one currency: per 1,000 prompt tokens, per 1,000
    completion tokens, per second of compute."""

    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    compute_per_second: float = 0.0


class UsageRecord(NamedTuple):
    """One ended call, as the ledger counts it (per tenant, key, model and UTC day).

    A named tuple: one is made per metered call, and a tuple is the cheapest to make."""

    tenant: str
    key_id: str
    model: str
    day: str  # UTC, "2024-06-30": the day the call was admitted
    requests: int
    errors: int  # 1 when the call failed or was cancelled
    prompt_tokens: int
    completion_tokens: int
    compute_seconds: float
    cost: float


class UsageSink(Protocol):
    def record(self, record: UsageRecord) -> None:
        """Takes one call's usage. Called on the hot path, once per metered call: it
        should queue the record and return, not write anywhere itself."""
        ...


def no_prices(model: str) -> Price | None:
    return None


def model_name(ref: str) -> str:
    """The model name in a reference ("name", "name:3", "name@alias")."""
    return ref.partition("@")[0].partition(":")[0]


UNRESOLVED = "(unresolved)"
# Plans the gate keeps (one per principal in use), and model refs per plan.
_MAX_PLANS = 10_000
_MAX_MODELS = 1_000
# Spend in micro-units stays far inside a 64-bit counter whatever a price times a count is.
_MAX_MICROS = 2**62


def _micro_units(amount: float) -> int:
    return round(amount) if 0 <= amount < _MAX_MICROS else (_MAX_MICROS if amount > 0 else 0)


def _ledger_model(call: Call) -> str:
    """The model a call is booked to: the one it resolved to. A call refused before that
    (an unknown or malformed model) is booked as UNRESOLVED: what a caller typed never
    becomes a ledger row of its own (no key pasted as a model name, no row per typo)."""
    resolved = call.fields.get("resolved")
    return model_name(resolved) if isinstance(resolved, str) and resolved else UNRESOLVED


class QuotaReservation:
    """What the gate reserved for one call; settled or released exactly once."""

    __slots__ = ("_call", "_day", "_done", "_gate", "_hold", "_price", "_started")

    def __init__(
        self,
        gate: QuotaGate,
        call: Call,
        hold: CounterHold | None,
        price: Price | None,
        day: str,
        started: float,
    ) -> None:
        self._gate = gate
        self._call = call
        self._started = started  # its compute is counted from here
        self._hold = hold
        self._price = price
        self._day = day
        self._done = False

    async def settle(self, usage: Usage | None) -> None:
        """The call ended normally: count what it used (None: nothing reported)."""
        remote = self._end(usage, 0)
        if remote is not None:
            await remote

    async def release(self) -> None:
        """The call failed or was cancelled: give back what it did not use. The
        request stays counted (it was admitted), and tokens the call produced before
        it ended (the handler's `note_usage`, e.g. a cancelled stream) are counted."""
        remote = self._end(self._call.usage, 1)
        if remote is not None:
            await remote

    def _end(self, usage: Usage | None, errors: int) -> Awaitable[None] | None:
        """Books the call's usage and settles an in-process hold; returns the settling
        still to await for a hold in another store. Not a coroutine: the in-process
        store settles on every call, and a coroutine costs more than the settling."""
        if self._done:
            return None
        self._done = True
        call = self._call
        prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        compute_s = time.perf_counter() - self._started
        price = self._price
        cost = (
            _micro_units(
                prompt * price.prompt_per_1k * 1000
                + completion * price.completion_per_1k * 1000
                + compute_s * price.compute_per_second * MICROS
            )
            if price is not None
            else 0
        )
        sink = self._gate.usage
        if sink is not None:
            principal = call.principal
            assert principal is not None  # reserved only for calls with a principal
            sink.record(
                UsageRecord(
                    principal.tenant,
                    principal.key_id,
                    _ledger_model(call),
                    self._day,
                    1,
                    errors,
                    prompt,
                    completion,
                    compute_s,
                    cost / MICROS,
                )
            )
        # After the ledger has it: a counter store that fails to settle loses no usage.
        hold = self._hold
        if type(hold) is LocalHold:
            hold.settle_now(prompt + completion, cost)  # in process: nothing to await
            return None
        return None if hold is None else hold.settle(prompt + completion, cost)


class _Plan:
    """What the gate works out once per principal rather than on every call."""

    __slots__ = ("fits_tokens", "local", "metered", "models", "principal", "spend_cap")

    def __init__(self, principal: Principal, spend_cap: int, local: LocalPlan | None) -> None:
        self.principal = principal
        # Model refs the key may call, as it named them -> the model name they name.
        self.models: dict[str, str] = {}
        self.spend_cap = spend_cap  # micro-units; 0: none
        self.metered = bool(
            self.spend_cap
            or is_limited(principal.key_limits)
            or is_limited(principal.tenant_limits)
        )
        # The most tokens a call may ask for and still fit every token limit when
        # nothing else is counted (check_fits says why a call over it never fits).
        bounds = [
            limit
            for limits in (principal.key_limits, principal.tenant_limits)
            for limit in (limits.tokens_per_minute, limits.tokens_per_day)
            if limit > 0
        ]
        self.fits_tokens = min(bounds, default=_MAX_MICROS)
        self.local = local


class QuotaGate:
    """The quota stage for the gateway's Generate and Infer calls (implements
    services.runtime.access.QuotaGate); other calls are not metered."""

    def __init__(
        self,
        counters: CounterStore,
        *,
        prices: Callable[[str], Price | None] = no_prices,
        usage: UsageSink | None = None,
        max_call_s: float = 300.0,
        max_stream_s: float = 3600.0,
        admits: Callable[[Principal, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`prices` gives a model name's price (None: free); `max_call_s` is how long a
        call without a deadline may run (the gateway's upstream timeout), the compute it
        is reserved; `max_stream_s` is how long a stream slot is held at most when never
        given back (in Redis, a dead gateway's slot lapses sooner, within its lease);
        `admits` raises when a key may not call the model a request names (checked
        before anything is reserved)."""
        self._counters = counters
        # The in-process store reserves without waiting: no coroutine on the hot path.
        self._local = counters if isinstance(counters, InProcessCounters) else None
        self._admits = admits
        # Plans by the id of the principal they were made for (the authentication
        # stage hands out one Principal object per key until it asks the auth service
        # again), so a call pays a dict lookup for them. Cleared when full.
        self._plans: dict[int, _Plan] = {}
        self._prices = prices
        self.usage = usage
        self._max_call_s = max_call_s
        self._max_stream_s = max_stream_s
        self._clock = clock
        self._calendar = UtcCalendar()
        # Requests of other APIs -> the platform request each is metered as.
        self._stands_for: dict[type, Callable[[Any], Any]] = {}

    def meter_as(self, kind: type, translate: Callable[[Any], Any]) -> None:
        """Meters requests of `kind` (another API's, e.g. KServe's ModelInfer) as the
        Generate or Infer `translate` makes of one. Looked up only for requests the gate
        does not know, so the platform's own calls pay nothing for it."""
        self._stands_for[kind] = translate

    async def close(self) -> None:
        await self._counters.close()

    def _plan(self, principal: Principal) -> _Plan:
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        spend_cap = _micro_units(principal.monthly_spend_cap * MICROS)
        local = None
        if self._local is not None:
            local = LocalPlan(
                key_id=principal.key_id,
                lineage_id=principal.lineage_id,
                tenant=principal.tenant,
                key_limits=principal.key_limits,
                tenant_limits=principal.tenant_limits,
                key_day_seed=principal.lineage_day_tokens,
                tenant_day_seed=principal.tenant_day_tokens,
                seed_day=principal.usage_day,
                spend_cap=spend_cap,
                spend_seed=_micro_units(principal.month_spend * MICROS),
                seed_month=principal.spend_month,
            )
        plan = self._plans[id(principal)] = _Plan(principal, spend_cap, local)
        return plan

    def _model(self, plan: _Plan, ref: str) -> str:
        """The model name `ref` names, once the key is allowed it (raises otherwise)."""
        if self._admits is not None:
            self._admits(plan.principal, ref)  # raises when not allowed
        if len(plan.models) >= _MAX_MODELS:
            plan.models.clear()  # callers cannot grow it unbounded
        name = plan.models[ref] = model_name(ref)
        return name

    async def reserve(
        self, call: Call, request: Any, *, started: float | None = None
    ) -> QuotaReservation | None:
        """`started`: when the reserved work began, if not with the call (one request
        of a KServe stream): its compute is counted from then."""
        principal = call.principal
        if principal is None:
            return None
        if started is None:
            started = call.started
        kind = type(request)
        if kind is _GENERATE:
            text = request.prompt
            # Its UTF-8 length, without copying an ASCII prompt to count it.
            prompt = len(text) if text.isascii() else len(text.encode())
            completion = max(request.max_tokens, 0)
            stream = True
        elif kind is _INFER:
            prompt = completion = 0
            stream = False
        else:
            translate = self._stands_for.get(kind)
            if translate is None:
                return None
            return await self.reserve(call, translate(request), started=started)
        plan = self._plans.get(id(principal))
        if plan is None or plan.principal is not principal:
            plan = self._plan(principal)
        ref = request.model
        model = plan.models.get(ref)
        if model is None:
            model = self._model(plan, ref)
        remaining = call.remaining()
        call_s = self._max_call_s if remaining is None else max(remaining, 0.0)
        price = self._prices(model)
        cost = 0
        if price is not None:
            # Rounded up (an upper bound), but not for a float's last-digit error; and
            # compute costs at least one micro-unit, so that a tenant at its cap is
            # refused even a call priced by compute only and ending at once.
            bound = (
                prompt * price.prompt_per_1k * 1000
                + completion * price.completion_per_1k * 1000
                + call_s * price.compute_per_second * MICROS
                - 1e-6
            )
            cost = (math.ceil(bound) if bound < _MAX_MICROS else _MAX_MICROS) + (
                1 if price.compute_per_second > 0 else 0
            )
        local, counters = plan.local, self._local
        if counters is not None:
            # The store's own clock: the day a call is booked to is the day it counted in.
            now, period = counters.now()
        else:
            now = self._clock()
            period = self._calendar.at(now)
        day = period.day_name
        if not plan.metered:
            # Nothing to enforce: no trip to the counters, only the ledger.
            return QuotaReservation(self, call, None, price, day, started)
        tokens = prompt + completion
        if (
            local is not None
            and counters is not None
            and tokens <= plan.fits_tokens
            and cost <= (plan.spend_cap or cost)
        ):
            hold = counters.reserve_planned(local, tokens, stream, cost, now, period)
            return QuotaReservation(self, call, hold, price, day, started)
        # A stream slot is never held past a little after the call's deadline would have
        # ended the stream anyway (in Redis, its lease is renewed up to then, no further).
        hold_s = min(call_s + 1.0, self._max_stream_s)
        demand = Demand(
            key_id=principal.key_id,
            tenant=principal.tenant,
            key_limits=principal.key_limits,
            tenant_limits=principal.tenant_limits,
            tokens=tokens,
            stream_s=hold_s if stream else 0.0,
            hold_s=hold_s,
            spend_cap=plan.spend_cap,
            # An answer the auth service gave last month says nothing about this one.
            spend_seed=(
                _micro_units(principal.month_spend * MICROS)
                if principal.spend_month == period.month_name
                else 0
            ),
            cost=cost,
            lineage_id=principal.lineage_id,
        )
        if principal.usage_day == day:  # yesterday's tokens say nothing about today's
            demand.key_day_seed = principal.lineage_day_tokens
            demand.tenant_day_seed = principal.tenant_day_tokens
        check_fits(demand)
        held = await self._counters.reserve(demand)
        return QuotaReservation(self, call, held, price, day, started)
