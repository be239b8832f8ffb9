"""Quota counters: what a call asks of them (`Demand`), the store protocol, and the
refusals every store gives.

A store checks every quota a call touches and reserves all of it in one atomic step,
or reserves nothing and raises ResourceExhausted naming the first quota over its limit.
What it holds per scope ("key:<lineage id>", "tenant:<id>"):
- a minute window: a log of the calls admitted in the last 60 s with the tokens each
  reserved (later settled), so requests and tokens per minute are exact sliding windows;
- tokens per UTC day, in one counter per day;
- the streams open now;
and per tenant the spend of the UTC month, in micro-units of the price currency.

A limit of 0 means no limit, and nothing is counted for it: a minute or stream limit set
later counts from then on, a day limit (and a spend cap) from what the ledger counted
today (this month). A day or spend counter is never below the ledger's count a call
brings (the seeds): one kept from before its limit was lifted and set again missed
what was used meanwhile.
The embedded store (local_counters.py) keeps this state in process, the redis store
(redis_counters.py) in Redis.
"""

from __future__ import annotations

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
        return scopes_of(
            self.key_id,
            self.lineage_id,
            self.tenant,
            (self.key_limits, self.tenant_limits),
            (self.key_day_seed, self.tenant_day_seed),
        )


def scopes_of(
    key_id: str,
    lineage_id: str,
    tenant: str,
    limits: tuple[Limits, Limits],
    day_seeds: tuple[int, int],
) -> tuple[tuple[str, str, Limits, int], tuple[str, str, Limits, int]]:
    """(name a refusal gives, name the counters are kept under, limits, day seed) of a
    key and of its tenant: a rotated key counts in its lineage's counters ("": its own),
    so the pair never has twice the key's limits."""
    key = "key:" + key_id
    counted = "key:" + lineage_id if lineage_id else key
    tenant_scope = "tenant:" + tenant
    return (
        (key, counted, limits[0], day_seeds[0]),
        (tenant_scope, tenant_scope, limits[1], day_seeds[1]),
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


def over_spend_cap(
    tenant: str, cap: int, spent: int, cost: int, retry_after_s: float
) -> ResourceExhausted:
    """The refusal of a call whose worst-case `cost` would take `tenant`, which has
    `spent` of its `cap` this month (micro-units), past its monthly spend cap (every
    counter store)."""
    return over_quota(
        f"tenant:{tenant}",
        MONTHLY_SPEND_CAP,
        limit=cap,
        used=spent,
        asked=cost,
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
