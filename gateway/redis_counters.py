"""Quota counters in Redis, shared by every gateway replica: one Lua script per check.

The state is that of the in-process store (local_counters.py), in Redis keys under a prefix;
the keys and the scripts that change them (reserve, settle, renew) are in redis_scripts.py.
A stream's slot is a lease of `stream_lease_s` (STREAM_LEASE_S), renewed in the background
while the stream runs (redis_leases.py): a gateway that dies holds its slots only until
their leases run out, not until its streams' deadlines.
Every give-back is exactly-once (a marker per reservation, there): one whose answer
never came (or whose caller was cut off) is tried again in the background a few times,
`recheck_s` apart, also while the gateway stops, and one given up is counted and logged.

Redis unreachable or failing: calls are refused with UNAVAILABLE, or with `fail_open`
admitted and counted in this process instead. Either way the switch is logged once, as
is the way back, and Redis is asked again at most every `recheck_s` meanwhile rather
than each call waiting out a timeout. A full connection pool is not Redis failing but
this gateway overloaded: that call alone is refused (RESOURCE_EXHAUSTED, retry shortly)
and Redis is not taken for down; except while Redis is marked down or a script timed
out within the last `recheck_s`, when the connections are full because they all wait on
a Redis that does not answer: that is the outage, and the call takes its path.

Redis 7.0 or newer is required (the scripts use `EXPIRE ... NX`); `check_server` says so
at start, before any call is served.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.counters import (
    CounterHold,
    Demand,
    UtcCalendar,
)
from gateway.local_counters import InProcessCounters
from gateway.redis_leases import StreamLease, StreamLeases
from gateway.redis_scripts import RESERVE, SETTLE, refusal
from services.runtime.errors import ResourceExhausted, Unavailable

log = structlog.get_logger("tensorgate.quota")

_DAY_TTL_S = 2 * 86400
_MONTH_GRACE_S = 86400
# A marker outlives its call by this much: a give-back comes after the call ends, and a
# reservation that timed out may still land a while later.
_MARKER_GRACE_MS = 60_000
# Background give-backs (after a timeout, or a failed settle) are tried this many times.
_GIVE_BACK_TRIES = 3
# At most this many wait in the background; past it they are counted as lost.
_MAX_PENDING_GIVE_BACKS = 10_000
_LOST_LOG_EVERY_S = 10.0
# How much longer than one round trip a call waits for a free connection (see __init__).
_POOL_WAIT_MARGIN_S = 0.1
MIN_REDIS_VERSION = (7, 0)
# How long a stream slot is held in Redis unless renewed: a dead gateway's slots are
# counted at most this long. Renewed every third of it, so a live stream keeps its slot
# through two failed rounds in a row (a Redis failover, a stalled event loop) and loses
# it only on the third; and a renewal round is one round trip per gateway every 10 s,
# whatever it holds. Shorter frees faster and renews more often.
STREAM_LEASE_S = 30.0
# Refused when the gateway's own connection pool stays full: local overload, not an outage.
OVERLOADED = "quota_store_connections"


def pool_exhausted(exc: BaseException) -> bool:
    """Whether `exc` is redis-py's BlockingConnectionPool timing out on a free connection
    (it has no exception type of its own): nothing was sent, and Redis is not at fault."""
    return (
        isinstance(exc, RedisConnectionError)
        and isinstance(exc.__cause__, asyncio.TimeoutError)
        and str(exc).startswith("No connection available")
    )


def _may_have_run(exc: BaseException) -> bool:
    """Whether a script that failed with `exc` may have run in Redis all the same: the
    answer timed out (the request was sent, or may have been)."""
    return isinstance(exc, RedisTimeoutError | asyncio.TimeoutError)


def parse_version(text: str) -> tuple[int, ...]:
    """ "7.0.15" -> (7, 0, 15); what is not a number counts as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in text.split(".")[:3])


class _RedisHold:
    __slots__ = ("_counters", "_flags", "_keys", "_marker_ms", "_reserved", "_rid", "landed")

    def __init__(
        self,
        counters: RedisCounters,
        rid: str,
        keys: list[str],
        flags: list[str],
        reserved: tuple[int, int],
        marker_ms: int,
    ) -> None:
        self._counters = counters
        self._rid = rid
        self._keys = keys
        self._flags: list[str] | None = flags
        self._reserved = reserved
        self._marker_ms = marker_ms
        # False while it is unknown whether the reservation was made (its answer never
        # came): a settle then also makes sure a late one reserves nothing.
        self.landed = True

    def settle_args(self, tokens: int, cost: int) -> list[Any] | None:
        """The settle script's ARGV, once (None: settled already). Its stream slot is no
        longer renewed from now on, before the settle is sent."""
        flags, self._flags = self._flags, None
        if flags is None:
            return None
        self._counters.leases.drop(self._rid)
        reserved_tokens, reserved_cost = self._reserved
        return [
            *(self._rid, tokens, tokens - reserved_tokens, cost - reserved_cost),
            *flags,
            "1" if self.landed else "0",
            self._marker_ms,
        ]

    @property
    def keys(self) -> list[str]:
        return self._keys

    async def settle(self, tokens: int, cost: int) -> None:
        args = self.settle_args(tokens, cost)
        if args is not None:
            await self._counters.run_settle(self._keys, args)


class RedisCounters:
    """Counters shared by gateway replicas through one Redis (`redis://host:port/db`)."""

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = False,
        prefix: str = "tg:quota:",
        connect_timeout_s: float = 0.5,
        timeout_s: float = 1.0,
        max_connections: int = 64,
        pool_timeout_s: float | None = None,
        recheck_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        on_lost: Callable[[], None] = lambda: None,
        stream_lease_s: float = STREAM_LEASE_S,
    ) -> None:
        """`timeout_s` bounds one round trip; `pool_timeout_s` how long a call waits for
        one of the `max_connections` connections (default: a little longer than a round
        trip, so that with Redis hung the scripts holding the connections time out, and
        mark it down, before the calls waiting for one give up). `on_lost` is called for
        each give-back given up (a metric's counter). A stream slot is held
        `stream_lease_s` at a time (or until the call's end, if sooner), renewed while
        the stream runs."""
        # No retries inside the client: a script retried after a timeout may already
        # have run, and would then count the call twice.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s + _POOL_WAIT_MARGIN_S if pool_timeout_s is None else pool_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = Redis.from_pool(pool)
        # EVALSHA, loading the script again when Redis answers NOSCRIPT (a restart).
        self._reserve = self._redis.register_script(RESERVE)
        self._settle = self._redis.register_script(SETTLE)
        self._prefix = prefix
        self._clock = clock
        self._calendar = UtcCalendar()
        self._local = InProcessCounters(clock=clock) if fail_open else None
        self._recheck_s = recheck_s
        # How long a stopping gateway waits for the give-backs still owed: all their tries.
        self._close_wait_s = _GIVE_BACK_TRIES * (recheck_s + timeout_s)
        self._down_until = 0.0  # monotonic; Redis is not asked again before
        self._down = False
        self._timed_out_at = -math.inf  # monotonic; the last script that timed out
        # Give-backs running in the background (cancelled callers, timeouts), kept
        # until they finish.
        self._settling: set[asyncio.Future[None]] = set()
        # Reservation ids must be unique across every store sharing the Redis: a random
        # prefix per store and a counter are, for far less than a uuid4 per call.
        self._rid_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self.lost_settlements = 0
        self._on_lost = on_lost
        self._lost_logged_until = -math.inf
        self.leases = StreamLeases(
            self._redis,
            lease_s=stream_lease_s,
            went_down=self._went_down,
            answered=self._answered,
            pool_exhausted=pool_exhausted,
        )

    @property
    def fail_open(self) -> bool:
        return self._local is not None

    async def check_server(self) -> None:
        """Raises RuntimeError, saying what to do, if the Redis answering is older than
        7.0. A Redis that cannot be reached now is not an error here: calls meanwhile
        are refused (or counted locally) as for any outage, and the scripts' first
        answer from an old Redis is an error the log names."""
        try:
            info = await self._redis.info("server")
        except (RedisError, OSError) as exc:
            log.warning(
                "quota store unreachable at start; its version is not checked",
                error=type(exc).__name__,
            )
            return
        version = str(info.get("redis_version", "0"))
        if parse_version(version) < MIN_REDIS_VERSION:
            wanted = ".".join(map(str, MIN_REDIS_VERSION))
            raise RuntimeError(
                f"the quota store (--redis-url) runs Redis {version}; quota counters need "
                f"Redis {wanted} or newer: upgrade it, or leave --redis-url unset to count "
                "in this gateway alone"
            )

    async def close(self) -> None:
        # Give-backs still being tried are what calls were owed back: a gateway that stops
        # (a rolling deploy) lets them run their tries before the connections go, rather
        # than leave stream slots, tokens and spend held until they expire.
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=self._close_wait_s)
        for task in list(self._settling):
            task.cancel()
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        # After the give-backs: the slots still held then lapse within a lease.
        await self.leases.stop()
        await self._redis.aclose()

    async def given_back(self) -> None:
        """Waits for the give-backs running in the background (for tests and shutdown)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def reserve(self, demand: Demand) -> CounterHold:
        if self._down and time.monotonic() < self._down_until:
            return await self._unreachable(demand)
        now = self._clock()
        period = self._calendar.at(now)
        rid = f"{self._rid_prefix}{next(self._ids):x}"
        tag = f"{self._prefix}{{{demand.tenant}}}:"
        (_, key_scope, _, _), (_, tenant_scope, _, _) = demand.scopes()
        key, tenant = f"{tag}{key_scope}:", f"{tag}{tenant_scope}:"
        day = period.day_name
        keys = [
            *(f"{key}w", f"{key}t", f"{key}d:{day}", f"{key}c"),
            *(f"{tenant}w", f"{tenant}t", f"{tenant}d:{day}", f"{tenant}c"),
            f"{tag}spend:{period.month_name}",
            f"{tag}r:{rid}",
        ]
        kl, tl = demand.key_limits, demand.tenant_limits
        stream_ms = int(demand.stream_s * 1000) if demand.stream_s > 0 else 0
        marker_ms = max(stream_ms, int(demand.hold_s * 1000)) + _MARKER_GRACE_MS
        args: list[Any] = [
            rid,
            demand.tokens,
            stream_ms,
            _DAY_TTL_S,
            *(kl.requests_per_minute, kl.tokens_per_minute),
            *(kl.tokens_per_day, kl.concurrent_streams),
            *(tl.requests_per_minute, tl.tokens_per_minute),
            *(tl.tokens_per_day, tl.concurrent_streams),
            demand.spend_cap,
            demand.spend_seed,
            demand.cost,
            int(period.month_end - now) + _MONTH_GRACE_S,
            marker_ms,
            demand.key_day_seed,
            demand.tenant_day_seed,
            self.leases.lease_ms,
        ]
        flags = []
        for limits in (kl, tl):
            flags.append("1" if limits.requests_per_minute or limits.tokens_per_minute else "0")
            flags.append("1" if limits.tokens_per_day else "0")
            flags.append("1" if stream_ms and limits.concurrent_streams else "0")
        flags.append("1" if demand.spend_cap else "0")
        hold = _RedisHold(self, rid, keys, flags, (demand.tokens, demand.cost), marker_ms)
        script = asyncio.ensure_future(self._reserve(keys, args))
        try:
            # Shielded: a caller that goes away mid round trip must not leave what the
            # script may already have reserved (a stream slot, spend) held until it expires.
            reply = await asyncio.shield(script)
        except asyncio.CancelledError:
            script.add_done_callback(partial(self._after_cancel, hold))
            raise
        except (RedisError, OSError) as exc:
            if pool_exhausted(exc):
                if not self._redis_hung():
                    raise self._overloaded() from None
                return await self._unreachable(demand)
            if _may_have_run(exc):
                self._give_back_later(hold)
            self._went_down(exc)
            return await self._unreachable(demand)
        self._answered()
        if reply[0] == 2:
            # Its id's give-back ran first: only a reservation whose caller had already
            # gone sees this, so this never reaches a caller that is still waiting.
            raise Unavailable("quota reservation abandoned; retry shortly")
        if reply[0] != 1:
            raise refusal(demand, reply, now, period.day_end, period.month_end)
        if stream_ms and (flags[2] == "1" or flags[5] == "1"):
            zsets = tuple(keys[i] for i, f in ((3, flags[2]), (7, flags[5])) if f == "1")
            self.leases.hold(rid, StreamLease(demand.tenant, zsets, int(reply[1]) + stream_ms))
        return hold

    def _after_cancel(self, hold: _RedisHold, script: asyncio.Future[Any]) -> None:
        """Gives back, with nothing used, a reservation whose caller was cancelled while
        the script ran: the request stays counted, the rest (stream slot, tokens, spend)
        is given back. A script that failed may have run all the same; if it did, its
        request leaves the window too (nobody was admitted)."""
        if script.cancelled() or script.exception() is not None:
            error = None if script.cancelled() else script.exception()
            if error is not None and pool_exhausted(error):
                return  # never sent
            self._give_back_later(hold)
        elif script.result()[0] == 1:
            self._give_back_later(hold, landed=True)

    def _give_back_later(self, hold: _RedisHold, *, landed: bool = False) -> None:
        hold.landed = landed
        args = hold.settle_args(0, 0)
        if args is not None:
            self._settle_later(hold.keys, args)

    def _settle_later(self, keys: list[str], args: list[Any]) -> None:
        if len(self._settling) >= _MAX_PENDING_GIVE_BACKS:
            self._lost("too many give-backs waiting")
            return
        task = asyncio.ensure_future(self._settle_with_retries(keys, args))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_with_retries(self, keys: list[str], args: list[Any]) -> None:
        # Safe to send again: the marker lets only one of them count.
        for attempt in range(_GIVE_BACK_TRIES):
            if attempt:
                await asyncio.sleep(self._recheck_s)
            try:
                await self._settle(keys, args)
            except (RedisError, OSError):
                continue
            return
        self._lost(f"the quota store failed {_GIVE_BACK_TRIES} tries")

    def _lost(self, why: str) -> None:
        """A give-back given up: what it held stays reserved until its counters expire
        (the minute window in 60 s, a stream slot within its lease, no longer renewed;
        the day's tokens and the month's spend keep the reserved bound). Counted, and
        logged at most every _LOST_LOG_EVERY_S with the running total, so an outage does
        not flood the log."""
        self.lost_settlements += 1
        self._on_lost()
        now = time.monotonic()
        if now >= self._lost_logged_until:
            self._lost_logged_until = now + _LOST_LOG_EVERY_S
            log.warning(
                "quota give-backs lost; what they held stays reserved until it expires",
                why=why,
                lost_total=self.lost_settlements,
            )

    async def run_settle(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self._settle(keys, args)
        except asyncio.CancelledError:
            # Cut off mid round trip (a stopping server cancels the calls left): it may or
            # may not have run, and is owed either way. Sent again in the background; the
            # marker lets one of them count.
            self._settle_later(keys, args)
            raise
        except (RedisError, OSError) as exc:
            # Not raised: the call itself went well. Tried again in the background (the
            # marker makes a settle that did run count once); if that fails too, what
            # stays reserved is bounded: the tokens leave the minute window within 60 s,
            # the stream slot frees within its lease (no longer renewed), and only the day
            # and spend counters keep the reserved upper bound.
            if not pool_exhausted(exc):
                self._went_down(exc)
            self._settle_later(keys, args)
            return
        self._answered()

    def _overloaded(self) -> ResourceExhausted:
        return ResourceExhausted(
            "this gateway has too many quota checks waiting for the quota store; retry shortly",
            subject=OVERLOADED,
            retry_after_s=self._recheck_s,
        )

    async def _unreachable(self, demand: Demand) -> CounterHold:
        if self._local is None:
            raise Unavailable("quota store unreachable; retry shortly")
        return self._local.reserve_now(demand)

    def _redis_hung(self) -> bool:
        """Whether a full pool is Redis not answering rather than this gateway overloaded:
        Redis is marked down, or a script timed out within the last recheck window."""
        return self._down or time.monotonic() - self._timed_out_at < self._recheck_s

    def _went_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + self._recheck_s
        if _may_have_run(exc):
            self._timed_out_at = now
        if not self._down:
            self._down = True
            log.warning(
                "quota store unreachable",
                error=type(exc).__name__,
                detail=str(exc)[:200],
                then="admitting and counting in this gateway" if self._local else "refusing",
            )

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.warning("quota store reachable again; counting in redis")
