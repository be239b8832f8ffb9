"""Quota counters in Redis, shared by every gateway replica: one Lua script per check.

The state is that of the in-process store (counters.py), in Redis keys under a prefix,
all of one tenant's in one hash slot (`{tenant}`), so a script's keys stay together on
a Redis Cluster as well. Per scope (a key or its tenant):
- `...:w` sorted set, reservation id -> admitted at (ms), and `...:t` hash, reservation
  id -> tokens plus `_sum`: the minute window (exact sliding log, one member per call);
- `...:d:<UTC day>` tokens of the day; `...:c` sorted set, reservation id -> expiry (ms):
  the streams open (a gateway that dies mid-stream leaks its slot only until then);
and per tenant `...:spend:<UTC month>`, micro-units spent, seeded from the ledger.
Every key has a TTL, so abandoned counters go away by themselves. The windows and the
stream expiries use Redis's clock (one clock for all replicas); the UTC day and month
are the gateway's.

A reservation whose answer never came (a timeout, a cancelled call) may have been made
all the same; it is then bounded like a dead gateway's: out of the minute window within
60 s, its stream slot free at its expiry, only the day and spend counters keep it.

Redis unreachable or failing: calls are refused with UNAVAILABLE, or with `fail_open`
admitted and counted in this process instead. Either way the switch is logged once, as
is the way back, and Redis is asked again at most every `recheck_s` meanwhile rather
than each call waiting out a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

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
from services.runtime.errors import Unavailable

log = structlog.get_logger("tensorgate.quota")

_QUOTAS = (REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE, TOKENS_PER_DAY, CONCURRENT_STREAMS)
_DAY_TTL_S = 2 * 86400
_MONTH_GRACE_S = 86400

# KEYS: scope 1 (the key) then scope 2 (the tenant), 4 each: window zset, window hash,
#   day counter, stream zset; KEYS[9] the tenant's spend this month.
# ARGV: rid, tokens, stream ms (0: not a stream), day ttl s, then the limits rpm, tpm,
#   tpd, streams of scope 1 and of scope 2 (5..12), spend cap, seed, cost, month ttl s.
# Returns {1} when all is reserved, else {0, scope (1 key, 2 tenant, 3 spend),
#   quota (1..4 as _QUOTAS, 5 spend), used, retry ms (-1: the gateway knows)}.
_RESERVE = """
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

local limits = {}
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
    local used = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
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
    redis.call('INCRBY', KEYS[k + 3], int(tokens))
    redis.call('EXPIRE', KEYS[k + 3], ARGV[4], 'NX')
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
return {1}
"""

# KEYS as _RESERVE. ARGV: rid, tokens, tokens delta, cost delta, then per scope whether
# it holds a window entry, day tokens, a stream (5..10), and whether spend was reserved.
# A counter that has expired meanwhile is left alone, never recreated.
_SETTLE = """
local rid, tokens = ARGV[1], tonumber(ARGV[2])
local function int(x) return string.format('%d', x) end
for s = 1, 2 do
  local k, a = (s - 1) * 4, 4 + (s - 1) * 3
  if ARGV[a + 1] == '1' then
    local old = redis.call('HGET', KEYS[k + 2], rid)
    if old then
      redis.call('HSET', KEYS[k + 2], rid, int(tokens))
      redis.call('HINCRBY', KEYS[k + 2], '_sum', int(tokens - tonumber(old)))
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


class _RedisHold:
    __slots__ = ("_counters", "_flags", "_keys", "_reserved", "_rid")

    def __init__(
        self,
        counters: RedisCounters,
        rid: str,
        keys: list[str],
        flags: list[str],
        reserved: tuple[int, int],
    ) -> None:
        self._counters = counters
        self._rid = rid
        self._keys = keys
        self._flags: list[str] | None = flags
        self._reserved = reserved

    async def settle(self, tokens: int, cost: int) -> None:
        flags, self._flags = self._flags, None
        if flags is None:
            return  # settled already
        reserved_tokens, reserved_cost = self._reserved
        args = [self._rid, tokens, tokens - reserved_tokens, cost - reserved_cost, *flags]
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
        recheck_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # No retries inside the client: a script retried after a timeout may already
        # have run, and would then count the call twice.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
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
        # Settlements of reservations whose callers were cancelled, kept until they finish.
        self._settling: set[asyncio.Future[None]] = set()
        # Reservation ids must be unique across every store sharing the Redis: a random
        # prefix per store and a counter are, for far less than a uuid4 per call.
        self._rid_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self.lost_settlements = 0

    @property
    def fail_open(self) -> bool:
        return self._local is not None

    async def close(self) -> None:
        await self._redis.aclose()

    async def reserve(self, demand: Demand) -> CounterHold:
        if self._down and time.monotonic() < self._down_until:
            return await self._unreachable(demand)
        now = self._clock()
        period = self._calendar.at(now)
        rid = f"{self._rid_prefix}{next(self._ids):x}"
        tag = f"{self._prefix}{{{demand.tenant}}}:"
        key, tenant = f"{tag}key:{demand.key_id}:", f"{tag}tenant:"
        day = period.day_name
        keys = [
            *(f"{key}w", f"{key}t", f"{key}d:{day}", f"{key}c"),
            *(f"{tenant}w", f"{tenant}t", f"{tenant}d:{day}", f"{tenant}c"),
            f"{tag}spend:{period.month_name}",
        ]
        kl, tl = demand.key_limits, demand.tenant_limits
        stream_ms = int(demand.stream_s * 1000) if demand.stream_s > 0 else 0
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
        ]
        flags = []
        for limits in (kl, tl):
            flags.append("1" if limits.requests_per_minute or limits.tokens_per_minute else "0")
            flags.append("1" if limits.tokens_per_day else "0")
            flags.append("1" if stream_ms and limits.concurrent_streams else "0")
        flags.append("1" if demand.spend_cap else "0")
        script = asyncio.ensure_future(self._reserve(keys, args))
        try:
            # Shielded: a caller that goes away mid round trip must not leave what the
            # script may already have reserved (a stream slot, spend) held until it expires.
            reply = await asyncio.shield(script)
        except asyncio.CancelledError:
            hold = _RedisHold(self, rid, keys, flags, (demand.tokens, demand.cost))
            script.add_done_callback(partial(self._give_back, hold))
            raise
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            return await self._unreachable(demand)
        self._answered()
        if reply[0] != 1:
            raise self._refusal(demand, reply, now, period.day_end, period.month_end)
        return _RedisHold(self, rid, keys, flags, (demand.tokens, demand.cost))

    def _give_back(self, hold: _RedisHold, script: asyncio.Future[Any]) -> None:
        """Settles, with nothing used, a reservation whose caller was cancelled while the
        script ran: the request stays counted, the rest (stream slot, tokens, spend) is
        given back."""
        if script.cancelled() or script.exception() is not None:
            return
        if script.result()[0] == 1:
            task = asyncio.ensure_future(hold.settle(0, 0))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

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
            # Not raised: the call itself went well. What stays reserved is bounded:
            # the tokens leave the minute window within 60 s, the stream slot at its
            # expiry; only the day and spend counters keep the reserved upper bound.
            self.lost_settlements += 1
            self._went_down(exc)
            return
        self._answered()

    async def _unreachable(self, demand: Demand) -> CounterHold:
        if self._local is None:
            raise Unavailable("quota store unreachable; retry shortly")
        return self._local.reserve_now(demand)

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._recheck_s
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
