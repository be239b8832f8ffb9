"""Quota counters in Redis, shared by every gateway replica: one Lua script per check.

The state is that of the in-process store (counters.py), in Redis keys under a prefix,
all of one tenant's in one hash slot (`{tenant}`), so a script's keys stay together on
a Redis Cluster as well. Per scope (a key's lineage, or its tenant):
- `...:w` sorted set, reservation id -> admitted at (ms), and `...:t` hash, reservation
  id -> tokens plus `_sum`: the minute window (exact sliding log, one member per call);
- `...:d:<UTC day>` tokens of the day, seeded from the ledger; `...:c` sorted set,
  reservation id -> expiry (ms): the streams open (a gateway that dies mid-stream leaks
  its slot only until then);
and per tenant `...:spend:<UTC month>`, micro-units spent, seeded from the ledger;
and per reservation a marker `...:r:<reservation id>` ("1" held, "0" given back).
Every key has a TTL, so abandoned counters go away by themselves. The windows and the
stream expiries use Redis's clock (one clock for all replicas); the UTC day and month
are the gateway's.

The marker makes every give-back exactly-once. A reservation whose answer never came
(a timeout, a cancelled caller) may or may not have been made, and may still be made
later (the script can sit in Redis's input buffer behind a slow command): its give-back
then finds the marker held (gives back, once), or finds none and leaves a "0" behind, so
a reservation that lands after its give-back reserves nothing. Settles use the marker
too, so a settle sent again after a timeout never counts twice. Such give-backs are
tried again in the background a few times, `recheck_s` apart.

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
    CONCURRENT_STREAMS,
    MONTHLY_SPEND_CAP,
    REQUESTS_PER_MINUTE,
    STREAM_RETRY_S,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    CounterHold,
    Demand,
    InProcessCounters,
    UtcCalendar,
    over_quota,
)
from services.runtime.errors import ResourceExhausted, Unavailable

log = structlog.get_logger("tensorgate.quota")

_QUOTAS = (REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE, TOKENS_PER_DAY, CONCURRENT_STREAMS)
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
# Refused when the gateway's own connection pool stays full: local overload, not an outage.
OVERLOADED = "quota_store_connections"

# KEYS: scope 1 (the key) then scope 2 (the tenant), 4 each: window zset, window hash,
#   day counter, stream zset; KEYS[9] the tenant's spend this month; KEYS[10] the marker.
# ARGV: rid, tokens, stream ms (0: not a stream), day ttl s, then the limits rpm, tpm,
#   tpd, streams of scope 1 and of scope 2 (5..12), spend cap, seed, cost, month ttl s,
#   marker ttl ms (17), then the day seed of scope 1 and of scope 2 (18, 19): where a
#   day counter starts when it does not exist yet.
# Returns {1} when all is reserved, {2} when given back before it ran (nothing done),
#   else {0, scope (1 key, 2 tenant, 3 spend), quota (1..4 as _QUOTAS, 5 spend), used,
#   retry ms (-1: the gateway knows)}.
_RESERVE = """
if redis.call('EXISTS', KEYS[10]) == 1 then return {2} end
local WINDOW = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, tokens, stream_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function int(x) return string.format('%d', x) end

local function prune(w, h)
  while true do
    local old = redis.call('ZRANGE', w, '-inf', int(now - WINDOW), 'BYSCORE', 'LIMIT', 0, 500)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', h, unpack(old))
    local freed = 0
    for i = 1, #amounts do freed = freed + (tonumber(amounts[i]) or 0) end
    redis.call('ZREM', w, unpack(old))
    redis.call('HDEL', h, unpack(old))
    redis.call('HINCRBY', h, '_sum', int(-freed))
  end
end

local function tokens_free_after(w, h, need)
  local start, freed = 0, 0
  while true do
    local page = redis.call('ZRANGE', w, start, start + 199, 'WITHSCORES')
    if #page == 0 then return WINDOW end
    local ids = {}
    for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
    local amounts = redis.call('HMGET', h, unpack(ids))
    for i = 1, #ids do
      freed = freed + (tonumber(amounts[i]) or 0)
      if freed >= need then return tonumber(page[2 * i]) + WINDOW - now end
    end
    start = start + 200
  end
end

local limits, day_fresh = {}, {}
for s = 1, 2 do
  local k, a = (s - 1) * 4, 4 + (s - 1) * 4
  local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tpd, streams = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  limits[s] = {rpm, tpm, tpd, streams}
  if rpm > 0 or tpm > 0 then
    prune(KEYS[k + 1], KEYS[k + 2])
    local count = redis.call('ZCARD', KEYS[k + 1])
    if rpm > 0 and count >= rpm then
      local oldest = redis.call('ZRANGE', KEYS[k + 1], count - rpm, count - rpm, 'WITHSCORES')
      return {0, s, 1, count, tonumber(oldest[2]) + WINDOW - now}
    end
    local used = tonumber(redis.call('HGET', KEYS[k + 2], '_sum') or '0')
    if tpm > 0 and used + tokens > tpm then
      return {0, s, 2, used, tokens_free_after(KEYS[k + 1], KEYS[k + 2], used + tokens - tpm)}
    end
  end
  if tpd > 0 then
    local held = redis.call('GET', KEYS[k + 3])
    local used = held and tonumber(held) or tonumber(ARGV[17 + s])
    day_fresh[s] = not held
    if used + tokens > tpd then return {0, s, 3, used, -1} end
  end
  if streams > 0 and stream_ms > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', int(now))
    local open = redis.call('ZCARD', KEYS[k + 4])
    if open >= streams then return {0, s, 4, open, -1} end
  end
end
local cap, cost = tonumber(ARGV[13]), tonumber(ARGV[15])
local spent = redis.call('GET', KEYS[9])
if cap > 0 then
  local used = spent and tonumber(spent) or tonumber(ARGV[14])
  if used + cost > cap then return {0, 3, 5, used, -1} end
end

-- Every check passed: reserve all of it.
for s = 1, 2 do
  local k, l = (s - 1) * 4, limits[s]
  if l[1] > 0 or l[2] > 0 then
    redis.call('ZADD', KEYS[k + 1], int(now), rid)
    redis.call('HSET', KEYS[k + 2], rid, int(tokens))
    redis.call('HINCRBY', KEYS[k + 2], '_sum', int(tokens))
    redis.call('PEXPIRE', KEYS[k + 1], WINDOW + 1000)
    redis.call('PEXPIRE', KEYS[k + 2], WINDOW + 1000)
  end
  if l[3] > 0 then
    if day_fresh[s] then
      redis.call('SET', KEYS[k + 3], int(tonumber(ARGV[17 + s]) + tokens), 'EX', ARGV[4])
    else
      redis.call('INCRBY', KEYS[k + 3], int(tokens))
      redis.call('EXPIRE', KEYS[k + 3], ARGV[4], 'NX')
    end
  end
  if l[4] > 0 and stream_ms > 0 then
    redis.call('ZADD', KEYS[k + 4], int(now + stream_ms), rid)
    if redis.call('PTTL', KEYS[k + 4]) < stream_ms + 1000 then
      redis.call('PEXPIRE', KEYS[k + 4], stream_ms + 1000)
    end
  end
end
if cap > 0 then
  if spent then
    redis.call('INCRBY', KEYS[9], int(cost))
  else
    redis.call('SET', KEYS[9], int(tonumber(ARGV[14]) + cost), 'EX', ARGV[16])
  end
end
redis.call('SET', KEYS[10], '1', 'PX', ARGV[17])
return {1}
"""

# KEYS as _RESERVE. ARGV: rid, tokens, tokens delta, cost delta, then per scope whether
# it holds a window entry, day tokens, a stream (5..10), whether spend was reserved (11),
# whether the reservation is known to have been made (12), marker ttl ms (13).
# Only a held marker is settled, once. A counter that has expired meanwhile is left
# alone, never recreated. A reservation not known to have been made leaves the minute
# window altogether: its caller heard UNAVAILABLE, so its request does not count.
# Returns 1 if it settled, 0 if there was nothing to settle.
_SETTLE = """
local mark = redis.call('GET', KEYS[10])
if mark ~= '1' then
  -- Not made (yet), given back already, or its marker expired. A reservation whose
  -- answer never came may still land: the "0" makes it reserve nothing.
  if not mark and ARGV[12] == '0' then redis.call('SET', KEYS[10], '0', 'PX', ARGV[13]) end
  return 0
end
if ARGV[12] == '1' then
  redis.call('DEL', KEYS[10])
else
  redis.call('SET', KEYS[10], '0', 'PX', ARGV[13])
end
local rid, tokens = ARGV[1], tonumber(ARGV[2])
local function int(x) return string.format('%d', x) end
for s = 1, 2 do
  local k, a = (s - 1) * 4, 4 + (s - 1) * 3
  if ARGV[a + 1] == '1' then
    local old = redis.call('HGET', KEYS[k + 2], rid)
    if old and ARGV[12] == '1' then
      redis.call('HSET', KEYS[k + 2], rid, int(tokens))
      redis.call('HINCRBY', KEYS[k + 2], '_sum', int(tokens - tonumber(old)))
    elseif old then
      redis.call('ZREM', KEYS[k + 1], rid)
      redis.call('HDEL', KEYS[k + 2], rid)
      redis.call('HINCRBY', KEYS[k + 2], '_sum', int(-tonumber(old)))
    end
  end
  if ARGV[a + 2] == '1' and redis.call('EXISTS', KEYS[k + 3]) == 1 then
    redis.call('INCRBY', KEYS[k + 3], ARGV[3])
  end
  if ARGV[a + 3] == '1' then redis.call('ZREM', KEYS[k + 4], rid) end
end
if ARGV[11] == '1' and redis.call('EXISTS', KEYS[9]) == 1 then
  redis.call('INCRBY', KEYS[9], ARGV[4])
end
return 1
"""


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
        """The settle script's ARGV, once (None: settled already)."""
        flags, self._flags = self._flags, None
        if flags is None:
            return None
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
    ) -> None:
        """`timeout_s` bounds one round trip; `pool_timeout_s` how long a call waits for
        one of the `max_connections` connections (default: a little longer than a round
        trip, so that with Redis hung the scripts holding the connections time out, and
        mark it down, before the calls waiting for one give up). `on_lost` is called for
        each give-back given up (a metric's counter)."""
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
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._prefix = prefix
        self._clock = clock
        self._calendar = UtcCalendar()
        self._local = InProcessCounters(clock=clock) if fail_open else None
        self._recheck_s = recheck_s
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
        for task in list(self._settling):
            task.cancel()
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
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
            raise self._refusal(demand, reply, now, period.day_end, period.month_end)
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
        (the minute window in 60 s, a stream slot at its deadline; the day's tokens and
        the month's spend keep the reserved bound). Counted, and logged at most every
        _LOST_LOG_EVERY_S with the running total, so an outage does not flood the log."""
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

    @staticmethod
    def _refusal(
        demand: Demand, reply: list[int], now: float, day_end: float, month_end: float
    ) -> Exception:
        _, scope_no, quota_no, used, retry_ms = (int(value) for value in reply)
        if quota_no == 5:
            return over_quota(
                f"tenant:{demand.tenant}",
                MONTHLY_SPEND_CAP,
                limit=demand.spend_cap,
                used=used,
                asked=demand.cost,
                retry_after_s=month_end - now,
            )
        scope, limits = (
            (f"key:{demand.key_id}", demand.key_limits)
            if scope_no == 1
            else (f"tenant:{demand.tenant}", demand.tenant_limits)
        )
        quota = _QUOTAS[quota_no - 1]
        if quota == TOKENS_PER_DAY:
            retry_after_s = day_end - now
        elif quota == CONCURRENT_STREAMS:
            retry_after_s = STREAM_RETRY_S
        else:
            retry_after_s = retry_ms / 1000
        return over_quota(
            scope,
            quota,
            limit=getattr(limits, quota),
            used=used,
            asked=1 if quota in (REQUESTS_PER_MINUTE, CONCURRENT_STREAMS) else demand.tokens,
            retry_after_s=retry_after_s,
        )

    async def run_settle(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self._settle(keys, args)
        except (RedisError, OSError) as exc:
            # Not raised: the call itself went well. Tried again in the background (the
            # marker makes a settle that did run count once); if that fails too, what
            # stays reserved is bounded: the tokens leave the minute window within 60 s,
            # the stream slot frees at its expiry, and only the day and spend counters
            # keep the reserved upper bound.
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
