"""Quota counters: what a call asks of them (`Demand`), the store protocol, and the
embedded in-process store.

A store checks every quota a call touches and reserves all of it in one atomic step,
or reserves nothing and raises ResourceExhausted naming the first quota over its limit.
What it holds per scope ("key:<lineage id>", "tenant:<id>"):
- a minute window: a log of the calls admitted in the last 60 s with the tokens each
  reserved (later settled), so requests and tokens per minute are exact sliding windows;
- tokens per UTC day, in one counter per day;
- the streams open now;
and per tenant the spend of the UTC month, in micro-units of the price currency.

A limit of 0 means no limit, and nothing is counted for it: a minute or stream limit set
later counts from then on, a day limit from what the ledger counted today.
The redis store (redis_counters.py) keeps the same state in Redis.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from services.runtime.calls import Limits
from services.runtime.errors import ResourceExhausted

WINDOW_S = 60.0
DAY_S = 86400.0
# Streams refused for the concurrency limit are told to retry after this long: when
# one of the open streams ends cannot be known in advance.
STREAM_RETRY_S = 1.0
# Spend is counted in millionths of the price currency: integers stay exact where
# summed floats would drift, and Redis counts integers atomically.
MICROS = 1_000_000

REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
TOKENS_PER_DAY = "tokens_per_day"
CONCURRENT_STREAMS = "concurrent_streams"
MONTHLY_SPEND_CAP = "monthly_spend_cap"


@dataclass(slots=True)
class Demand:
    """What one call asks of the counters: all of it is reserved, or none."""

    key_id: str
    tenant: str
    key_limits: Limits
    tenant_limits: Limits
    # Upper bound of the call's tokens (prompt bound + max_tokens).
    tokens: int = 0
    # > 0: the call holds a stream slot, for at most this long if never given back.
    stream_s: float = 0.0
    # How long the call may run at most: how long a give-back may still come.
    hold_s: float = 0.0
    # Micro-units; a cap of 0 means none. The seed is what the tenant had spent this
    # month when the counter did not exist yet (from the ledger).
    spend_cap: int = 0
    spend_seed: int = 0
    cost: int = 0
    # The key whose per-key counters this call counts in ("": key_id): a rotated key
    # shares its predecessor's, so the pair never has twice the key's limits.
    lineage_id: str = ""
    # What the key's lineage and the tenant used today when their day counter did not
    # exist yet (from the ledger).
    key_day_seed: int = 0
    tenant_day_seed: int = 0

    def scopes(self) -> tuple[tuple[str, str, Limits, int], tuple[str, str, Limits, int]]:
        """(name a refusal gives, name the counters are kept under, limits, day seed) of
        the key and of the tenant."""
        key = "key:" + self.key_id
        counted = "key:" + self.lineage_id if self.lineage_id else key
        tenant = "tenant:" + self.tenant
        return (
            (key, counted, self.key_limits, self.key_day_seed),
            (tenant, tenant, self.tenant_limits, self.tenant_day_seed),
        )


class CounterHold(Protocol):
    """What a store reserved for one call, until the call ends."""

    async def settle(self, tokens: int, cost: int) -> None:
        """The call ended: count `tokens` and `cost` (micro-units) instead of what was
        reserved, and give back its stream slot. The request itself stays counted."""
        ...


class CounterStore(Protocol):
    async def reserve(self, demand: Demand) -> CounterHold:
        """Reserves `demand` atomically; raises ResourceExhausted (over a quota) or
        Unavailable (the store cannot answer)."""
        ...

    async def close(self) -> None: ...


class Period(NamedTuple):
    """The UTC day and month a unix time falls in."""

    day: int  # days since the epoch
    day_name: str  # "2024-06-30"
    day_end: float
    month_name: str  # "2024-06"
    month_end: float


class UtcCalendar:
    """`Period`s, computed once per day rather than once per call."""

    def __init__(self) -> None:
        self._period = Period(-1, "", 0.0, "", 0.0)

    def at(self, now: float) -> Period:
        period = self._period
        if period.day_end - DAY_S <= now < period.day_end:
            return period
        day = int(now // DAY_S)
        start = datetime.fromtimestamp(day * DAY_S, UTC)
        next_month = (
            start.replace(year=start.year + 1, month=1, day=1)
            if start.month == 12
            else start.replace(month=start.month + 1, day=1)
        )
        self._period = period = Period(
            day,
            start.strftime("%Y-%m-%d"),
            (day + 1) * DAY_S,
            start.strftime("%Y-%m"),
            next_month.timestamp(),
        )
        return period


def _who(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return f"{kind} {name}"


def _wait(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def over_quota(
    scope: str, quota: str, *, limit: int, used: int, asked: int, retry_after_s: float
) -> ResourceExhausted:
    """The refusal for `quota` of `scope` ("key:<id>", "tenant:<id>"), in words a caller
    can act on: which quota, its limit, and when enough of it frees up."""
    who, wait = _who(scope), _wait(retry_after_s)
    if quota == REQUESTS_PER_MINUTE:
        text = f"{who} is at its limit of {limit} requests per minute; one frees in {wait}"
    elif quota == CONCURRENT_STREAMS:
        text = f"{who} has all {limit} of its concurrent streams open; retry in {wait}"
    elif quota == MONTHLY_SPEND_CAP:
        text = (
            f"{who} has spent {used / MICROS:.2f} of its monthly spend cap of "
            f"{limit / MICROS:.2f} and this call may cost {asked / MICROS:.4f}; "
            f"the cap resets with the UTC month, in {wait}"
        )
    else:
        per, frees = (
            ("minute", "enough frees in")
            if quota == TOKENS_PER_MINUTE
            else ("day", "the UTC day ends in")
        )
        text = (
            f"{who} has used {used} of its {limit} tokens per {per} and this call may use "
            f"{asked} (prompt + max_tokens); {frees} {wait}"
        )
    return ResourceExhausted(text, subject=f"{scope}:{quota}", retry_after_s=retry_after_s)


def over_spend_cap(demand: Demand, spent: int, retry_after_s: float) -> ResourceExhausted:
    """The refusal of a call whose worst-case cost would take its tenant, which has
    `spent` micro-units this month, past its monthly spend cap (every counter store)."""
    return over_quota(
        f"tenant:{demand.tenant}",
        MONTHLY_SPEND_CAP,
        limit=demand.spend_cap,
        used=spent,
        asked=demand.cost,
        retry_after_s=retry_after_s,
    )


def _never_fits(scope: str, quota: str, limit: int, asked: int) -> ResourceExhausted:
    if quota == MONTHLY_SPEND_CAP:
        ask, have = f"may cost {asked / MICROS:.4f}", f"{limit / MICROS:.2f}"
        # Compute is reserved for as long as the call may run.
        fix = "lower max_tokens, shorten the prompt or set a shorter deadline"
    else:
        ask, have = f"may use {asked} tokens", str(limit)
        fix = "lower max_tokens or shorten the prompt"
    return ResourceExhausted(
        f"this call {ask}, more than the whole {quota.replace('_', ' ')} of {_who(scope)} "
        f"({have}): {fix}; retrying will not help",
        subject=f"{scope}:{quota}",
        retry_after_s=0.0,
    )


def check_fits(demand: Demand) -> None:
    """Refuses a call that could never fit a limit even with nothing else counted, so
    that it is not told to retry."""
    tokens, key, tenant = demand.tokens, demand.key_limits, demand.tenant_limits
    # One test on the hot path; the refusal is worked out only for a call that needs it.
    if (
        0 < key.tokens_per_minute < tokens
        or 0 < key.tokens_per_day < tokens
        or 0 < tenant.tokens_per_minute < tokens
        or 0 < tenant.tokens_per_day < tokens
        or 0 < demand.spend_cap < demand.cost
    ):
        raise _never_fits_refusal(demand)


def _never_fits_refusal(demand: Demand) -> ResourceExhausted:
    tokens = demand.tokens
    for scope, limits in (
        (f"key:{demand.key_id}", demand.key_limits),
        (f"tenant:{demand.tenant}", demand.tenant_limits),
    ):
        if 0 < limits.tokens_per_minute < tokens:
            return _never_fits(scope, TOKENS_PER_MINUTE, limits.tokens_per_minute, tokens)
        if 0 < limits.tokens_per_day < tokens:
            return _never_fits(scope, TOKENS_PER_DAY, limits.tokens_per_day, tokens)
    return _never_fits(f"tenant:{demand.tenant}", MONTHLY_SPEND_CAP, demand.spend_cap, demand.cost)


def is_limited(limits: Limits) -> bool:
    return bool(
        limits.requests_per_minute
        or limits.tokens_per_minute
        or limits.tokens_per_day
        or limits.concurrent_streams
    )


# -- the embedded store -------------------------------------------------------------


class _Scope:
    """The counters of one key or tenant.

    The minute window is a log of the calls admitted in the last minute, kept as two
    deques of plain numbers (when, tokens) rather than an object per call: a busy key
    holds one entry per call for 60 s, and numbers are nothing to the garbage collector.
    An entry is found again by its sequence number: `first` is the oldest one's."""

    __slots__ = ("admitted", "day", "day_tokens", "first", "streams", "tokens", "window_tokens")

    def __init__(self) -> None:
        self.admitted: deque[float] = deque()
        self.tokens: deque[int] = deque()
        self.first = 0
        self.window_tokens = 0
        self.day = -1
        self.day_tokens = 0
        self.streams = 0

    def admit(self, now: float, tokens: int) -> int:
        """Logs a call in the minute window; returns its sequence number."""
        self.admitted.append(now)
        self.tokens.append(tokens)
        self.window_tokens += tokens
        return self.first + len(self.admitted) - 1

    def resettle(self, seq: int, tokens: int) -> None:
        """The call `seq` used `tokens`; one the window has dropped no longer counts."""
        index = seq - self.first
        if index >= 0:  # near the right end for most calls: deque indexing is quick there
            self.window_tokens += tokens - self.tokens[index]
            self.tokens[index] = tokens

    def prune(self, now: float) -> None:
        # An entry counts for exactly WINDOW_S: from its time up to, not including, +60 s.
        admitted, cutoff = self.admitted, now - WINDOW_S
        while admitted and admitted[0] <= cutoff:
            admitted.popleft()
            self.window_tokens -= self.tokens.popleft()
            self.first += 1

    def tokens_free_after(self, need: int, now: float) -> float:
        """Seconds until entries holding `need` tokens have aged out."""
        freed = 0
        for at, tokens in zip(self.admitted, self.tokens, strict=True):
            freed += tokens
            if freed >= need:
                return at + WINDOW_S - now
        return WINDOW_S


class LocalHold:
    """What the in-process store reserved for one call; settled without waiting."""

    __slots__ = ("_counters", "day", "day_scopes", "entries", "reserved", "spend_key", "streams")

    def __init__(self, counters: InProcessCounters, day: int, tokens: int, cost: int) -> None:
        self._counters = counters
        self.day = day
        self.reserved = (tokens, cost)
        # (scope, sequence number) of the call's minute-window entries.
        self.entries: list[tuple[_Scope, int]] = []
        self.day_scopes: list[_Scope] = []
        self.streams: list[_Scope] = []
        self.spend_key = ""

    async def settle(self, tokens: int, cost: int) -> None:
        self._counters.settle_now(self, tokens, cost)

    def settle_now(self, tokens: int, cost: int) -> None:
        """`settle`, synchronously (nothing to wait for in process)."""
        self._counters.settle_now(self, tokens, cost)


class InProcessCounters:
    """The embedded store: plain dicts and deques in this process, pruned lazily.

    Exact for one gateway (everything a reservation does happens in one synchronous
    step, with no await in between). Memory is bounded by the keys and tenants active
    in the last minute and today: idle scopes are swept once a minute.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._calendar = UtcCalendar()
        self._scopes: dict[str, _Scope] = {}
        # "<tenant>:<UTC month>" -> micro-units spent.
        self._spend: dict[str, int] = {}
        self._next_sweep = 0.0

    def _scope(self, name: str) -> _Scope:
        scope = self._scopes.get(name)
        if scope is None:
            scope = self._scopes[name] = _Scope()
        return scope

    async def reserve(self, demand: Demand) -> CounterHold:
        return self.reserve_now(demand)

    async def close(self) -> None:
        """Nothing to close: the counters go with the process."""

    def reserve_now(self, demand: Demand) -> LocalHold:
        """`reserve`, synchronously: the critical section."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        period = self._calendar.at(now)
        tokens, stream = demand.tokens, demand.stream_s > 0
        checked: list[tuple[_Scope, Limits]] = []
        for name, counted, limits, day_seed in demand.scopes():
            if not is_limited(limits):
                continue
            scope = self._scope(counted)
            if limits.tokens_per_day and scope.day != period.day:
                # A day counter that starts now (a restart) starts from the ledger.
                scope.day, scope.day_tokens = period.day, day_seed
            self._check(scope, name, limits, tokens, stream, now, period)
            checked.append((scope, limits))
        spend_key, spent = "", 0
        if demand.spend_cap:
            spend_key = f"{demand.tenant}:{period.month_name}"
            spent = self._spend.get(spend_key, demand.spend_seed)
            if spent + demand.cost > demand.spend_cap:
                raise over_spend_cap(demand, spent, period.month_end - now)
        # Every check passed: from here on nothing can refuse.
        hold = LocalHold(self, period.day, tokens, demand.cost)
        for scope, limits in checked:
            if limits.requests_per_minute or limits.tokens_per_minute:
                hold.entries.append((scope, scope.admit(now, tokens)))
            if limits.tokens_per_day:
                scope.day_tokens += tokens
                hold.day_scopes.append(scope)
            if stream and limits.concurrent_streams:
                scope.streams += 1
                hold.streams.append(scope)
        if spend_key:
            self._spend[spend_key] = spent + demand.cost
            hold.spend_key = spend_key
        return hold

    @staticmethod
    def _check(
        scope: _Scope,
        name: str,
        limits: Limits,
        tokens: int,
        stream: bool,
        now: float,
        period: Period,
    ) -> None:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm or tpm:
            scope.prune(now)
            count = len(scope.admitted)
            if rpm and count >= rpm:
                oldest = scope.admitted[count - rpm]
                raise over_quota(
                    name,
                    REQUESTS_PER_MINUTE,
                    limit=rpm,
                    used=count,
                    asked=1,
                    retry_after_s=oldest + WINDOW_S - now,
                )
            used = scope.window_tokens
            if tpm and used + tokens > tpm:
                raise over_quota(
                    name,
                    TOKENS_PER_MINUTE,
                    limit=tpm,
                    used=used,
                    asked=tokens,
                    retry_after_s=scope.tokens_free_after(used + tokens - tpm, now),
                )
        tpd = limits.tokens_per_day
        if tpd:
            if scope.day != period.day:
                scope.day, scope.day_tokens = period.day, 0
            if scope.day_tokens + tokens > tpd:
                raise over_quota(
                    name,
                    TOKENS_PER_DAY,
                    limit=tpd,
                    used=scope.day_tokens,
                    asked=tokens,
                    retry_after_s=period.day_end - now,
                )
        streams = limits.concurrent_streams
        if stream and streams and scope.streams >= streams:
            raise over_quota(
                name,
                CONCURRENT_STREAMS,
                limit=streams,
                used=scope.streams,
                asked=1,
                retry_after_s=STREAM_RETRY_S,
            )

    def settle_now(self, hold: LocalHold, tokens: int, cost: int) -> None:
        reserved_tokens, reserved_cost = hold.reserved
        delta = tokens - reserved_tokens
        for scope, seq in hold.entries:
            scope.resettle(seq, tokens)
        for scope in hold.day_scopes:
            if scope.day == hold.day:  # a day that has ended is not counted any more
                scope.day_tokens += delta
        for scope in hold.streams:
            scope.streams -= 1
        spend_key = hold.spend_key
        if spend_key and spend_key in self._spend:
            self._spend[spend_key] += cost - reserved_cost
        # Settling twice must not give back twice.
        hold.entries, hold.day_scopes, hold.streams, hold.spend_key = [], [], [], ""

    def _sweep(self, now: float) -> None:
        """Drops scopes with nothing counted, and spend of past months."""
        self._next_sweep = now + WINDOW_S
        period = self._calendar.at(now)
        idle = []
        for name, scope in self._scopes.items():
            scope.prune(now)
            if not scope.admitted and not scope.streams and scope.day != period.day:
                idle.append(name)
        for name in idle:
            del self._scopes[name]
        suffix = f":{period.month_name}"
        for key in [key for key in self._spend if not key.endswith(suffix)]:
            del self._spend[key]
