"""The embedded quota counters: every quota of the counters protocol (counters.py),
kept in this process.

Exact for one gateway: a reservation checks and reserves in one synchronous step, with
no await in between, so concurrent calls cannot both take the last unit of a limit.
Several gateways share a limit only through Redis (redis_counters.py).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.counters import (
    CONCURRENT_STREAMS,
    REQUESTS_PER_MINUTE,
    STREAM_RETRY_S,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    WINDOW_S,
    CounterHold,
    Demand,
    Period,
    UtcCalendar,
    is_limited,
    over_quota,
    over_spend_cap,
    scopes_of,
)
from services.runtime.calls import Limits


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


class LocalPlan:
    """What one principal's calls count in, worked out once rather than on every call:
    the scopes of its key (its lineage's counters) and its tenant with their limits, its
    tenant's spend cap, and the ledger's seeds for counters that start empty. The
    counters resolve it again after a sweep has dropped idle scopes."""

    __slots__ = (
        "checks",
        "daily",
        "scopes",
        "seed_day",
        "seed_month",
        "spend_cap",
        "spend_key",
        "spend_month",
        "spend_seed",
        "streamed",
        "sweeps",
        "tenant",
        "windowed",
    )

    def __init__(
        self,
        *,
        key_id: str,
        lineage_id: str,
        tenant: str,
        key_limits: Limits,
        tenant_limits: Limits,
        key_day_seed: int,
        tenant_day_seed: int,
        seed_day: str,
        spend_cap: int,
        spend_seed: int,
        seed_month: str,
    ) -> None:
        """Seeds count only on `seed_day` (UTC, "2024-06-30") and `seed_month`
        ("2024-06"): what the ledger said then says nothing about a later day."""
        self.scopes = scopes_of(
            key_id,
            lineage_id,
            tenant,
            (key_limits, tenant_limits),
            (key_day_seed, tenant_day_seed),
        )
        self.tenant = tenant
        self.seed_day = seed_day
        self.spend_cap = spend_cap
        self.spend_seed = spend_seed
        self.seed_month = seed_month
        self.spend_month = self.spend_key = ""
        self.sweeps = -1  # not resolved yet
        # (scope, name, limits, day seed, and the limits: rpm, tpm, tpd, streams)
        self.checks: list[tuple[_Scope, str, Limits, int, int, int, int, int]] = []
        self.windowed: list[_Scope] = []
        self.daily: list[_Scope] = []
        self.streamed: list[_Scope] = []


def _spend_key(plan: LocalPlan, period: Period) -> str:
    """Where the spend of `plan`'s tenant in `period`'s month is kept ("<tenant>:<UTC
    month>"), made once a month per plan."""
    if plan.spend_month != period.month_name:
        plan.spend_month = period.month_name
        plan.spend_key = f"{plan.tenant}:{period.month_name}"
    return plan.spend_key


# A hold's "nothing counted here": shared, never changed in place.
_NONE: list[Any] = []


class LocalHold:
    """What the in-process store reserved for one call; settled without waiting."""

    __slots__ = ("_counters", "day", "day_scopes", "entries", "reserved", "spend_key", "streams")

    def __init__(self, counters: InProcessCounters, day: int, tokens: int, cost: int) -> None:
        self._counters = counters
        self.day = day
        self.reserved = (tokens, cost)
        # (scope, sequence number) of the call's minute-window entries.
        self.entries: list[tuple[_Scope, int]] = _NONE
        self.day_scopes: list[_Scope] = _NONE
        self.streams: list[_Scope] = _NONE
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
        # Bumped by every sweep: plans resolved before may point at scopes it dropped.
        self._sweeps = 0

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
        now, period = self.now()
        # The gate gave day seeds only for today and a spend seed only for this month.
        plan = LocalPlan(
            key_id=demand.key_id,
            lineage_id=demand.lineage_id,
            tenant=demand.tenant,
            key_limits=demand.key_limits,
            tenant_limits=demand.tenant_limits,
            key_day_seed=demand.key_day_seed,
            tenant_day_seed=demand.tenant_day_seed,
            seed_day=period.day_name,
            spend_cap=demand.spend_cap,
            spend_seed=demand.spend_seed,
            seed_month=period.month_name,
        )
        return self.reserve_planned(
            plan, demand.tokens, demand.stream_s > 0, demand.cost, now, period
        )

    def _resolve(self, plan: LocalPlan, period: Period) -> None:
        """Points `plan` at the scopes its calls count in, as they are now.

        A day or spend counter that exists may have missed calls: none is counted while
        its limit is 0, so one left from before a limit was lifted and set again is
        short of what was used meanwhile, which the ledger counted (the plan's seeds).
        The larger of the two is the count; never less than the counter, so seeds read
        earlier cannot set it back. Done here, once per plan (a principal the auth
        service answered anew, as it does when limits change) and per sweep."""
        plan.sweeps = self._sweeps
        plan.checks, plan.windowed, plan.daily, plan.streamed = [], [], [], []
        seeds_today = plan.seed_day == period.day_name
        for name, counted, limits, day_seed in plan.scopes:
            if not is_limited(limits):
                continue
            scope = self._scope(counted)
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            tpd, streams = limits.tokens_per_day, limits.concurrent_streams
            plan.checks.append((scope, name, limits, day_seed, rpm, tpm, tpd, streams))
            if rpm or tpm:
                plan.windowed.append(scope)
            if tpd:
                plan.daily.append(scope)
                if seeds_today and scope.day == period.day and scope.day_tokens < day_seed:
                    scope.day_tokens = day_seed
            if streams:
                plan.streamed.append(scope)
        if plan.spend_cap and plan.seed_month == period.month_name:
            spend_key = _spend_key(plan, period)
            if self._spend.get(spend_key, plan.spend_seed) < plan.spend_seed:
                self._spend[spend_key] = plan.spend_seed

    def reserve_planned(
        self, plan: LocalPlan, tokens: int, stream: bool, cost: int, now: float, period: Period
    ) -> LocalHold:
        """Reserves a request, `tokens`, a stream slot when `stream` and `cost` for the
        principal `plan` describes at `now` (this store's clock) in `period`, or raises
        ResourceExhausted and reserves nothing."""
        if now >= self._next_sweep:
            self._sweep(now)
        if plan.sweeps != self._sweeps:
            self._resolve(plan, period)
        cutoff = now - WINDOW_S
        # The checks inline, with the limits read once per plan: this runs on every call.
        # A check that fails hands over to _check, which words the refusal.
        for scope, name, limits, day_seed, rpm, tpm, tpd, streams in plan.checks:
            if rpm or tpm:
                admitted = scope.admitted
                if admitted and admitted[0] <= cutoff:
                    scope.prune(now)
                if (rpm and len(admitted) >= rpm) or (tpm and scope.window_tokens + tokens > tpm):
                    self._check(scope, name, limits, tokens, stream, now, period)
            if tpd:
                if scope.day != period.day:
                    # A day counter that starts now (a restart) starts from the ledger.
                    scope.day = period.day
                    scope.day_tokens = day_seed if plan.seed_day == period.day_name else 0
                if scope.day_tokens + tokens > tpd:
                    self._check(scope, name, limits, tokens, stream, now, period)
            if stream and streams and scope.streams >= streams:
                self._check(scope, name, limits, tokens, stream, now, period)
        spend_key, spent, cap = "", 0, plan.spend_cap
        if cap:
            spend_key = _spend_key(plan, period)
            spent = self._spend.get(spend_key, -1)
            if spent < 0:
                spent = plan.spend_seed if plan.seed_month == period.month_name else 0
            if spent + cost > cap:
                raise over_spend_cap(plan.tenant, cap, spent, cost, period.month_end - now)
        # Every check passed: from here on nothing can refuse.
        hold = LocalHold(self, period.day, tokens, cost)
        if plan.windowed:
            hold.entries = [(scope, scope.admit(now, tokens)) for scope in plan.windowed]
        if plan.daily:
            for scope in plan.daily:
                scope.day_tokens += tokens
            hold.day_scopes = plan.daily  # never changed in place: _resolve makes new lists
        if stream and plan.streamed:
            for scope in plan.streamed:
                scope.streams += 1
            hold.streams = plan.streamed
        if spend_key:
            self._spend[spend_key] = spent + cost
            hold.spend_key = spend_key
        return hold

    def now(self) -> tuple[float, Period]:
        """This store's time, and the UTC day and month it falls in."""
        now = self._clock()
        return now, self._calendar.at(now)

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
        hold.entries, hold.day_scopes, hold.streams, hold.spend_key = _NONE, _NONE, _NONE, ""

    def _sweep(self, now: float) -> None:
        """Drops scopes with nothing counted, and spend of past months."""
        self._next_sweep = now + WINDOW_S
        self._sweeps += 1
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
