"""The two Lua scripts behind Redis quota counters (redis_counters.py), the keys they
keep, and what a refused reservation's reply tells the caller. Each check is one script,
so one atomic round trip.

The state is that of the in-process store (local_counters.py), in Redis keys under a prefix,
all of one tenant's in one hash slot (`{tenant}`), so a script's keys stay together on
a Redis Cluster as well. Per scope (a key's lineage, or its tenant):
- `...:w` sorted set, reservation id -> admitted at (ms), and `...:t` hash, reservation
  id -> tokens plus `_sum`: the minute window (exact sliding log, one member per call);
- `...:d:<UTC day>` tokens of the day, never below the ledger's; `...:c` sorted set,
  reservation id -> expiry (ms): the streams open. A slot is a lease: taken for a short
  while (the gateway's stream lease, or less when the call must end sooner), renewed by
  RENEW while its stream runs, never past the call's own end; so a gateway that dies
  mid-stream holds its slots only until their lease runs out;
and per tenant `...:spend:<UTC month>`, micro-units spent, never below the ledger's;
and per reservation a marker `...:r:<reservation id>` ("1" held, "0" given back).
Every key has a TTL, so abandoned counters go away by themselves. The windows and the
stream expiries use Redis's clock (one clock for all replicas); the UTC day and month
are the gateway's. `EXPIRE ... NX` needs Redis 7.0 or newer.

The marker makes every give-back exactly-once. A reservation whose answer never came
(a timeout, a cancelled caller) may or may not have been made, and may still be made
later (the script can sit in Redis's input buffer behind a slow command): its give-back
then finds the marker held (gives back, once, the request's window entry included), or
finds none and leaves a "0" behind, so a reservation that lands after its give-back
reserves nothing. Settles use the marker too, so a settle sent again after a timeout
never counts twice.
"""

from __future__ import annotations

from gateway.counters import (
    CONCURRENT_STREAMS,
    REQUESTS_PER_MINUTE,
    STREAM_RETRY_S,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    Demand,
    over_quota,
    over_spend_cap,
)

_QUOTAS = (REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE, TOKENS_PER_DAY, CONCURRENT_STREAMS)

# KEYS: scope 1 (the key) then scope 2 (the tenant), 4 each: window zset, window hash,
#   day counter, stream zset; KEYS[9] the tenant's spend this month; KEYS[10] the marker.
# ARGV: rid, tokens, stream ms (0: not a stream), day ttl s, then the limits rpm, tpm,
#   tpd, streams of scope 1 and of scope 2 (5..12), spend cap, seed, cost, month ttl s,
#   marker ttl ms (17), then the day seed of scope 1 and of scope 2 (18, 19). A seed is
#   the ledger's count: the least a counter holds (where it starts when it does not
#   exist yet); then the stream lease ms (20): a stream slot is held that long, or stream ms
#   when shorter, until RENEW extends it.
# Returns {1, Redis's time in ms} when all is reserved, {2} when given back before it
#   ran (nothing done), else {0, scope (1 key, 2 tenant, 3 spend), quota (1..4 as
#   _QUOTAS, 5 spend), used, retry ms (-1: the gateway knows)}.
RESERVE = """
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

local limits, day_used, day_set = {}, {}, {}
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
    -- Never below the ledger's count (the seed): a counter kept from before this limit
    -- was lifted (0 counts nothing) and set again missed what was used meanwhile.
    local held, seed = tonumber(redis.call('GET', KEYS[k + 3]) or '-1'), tonumber(ARGV[17 + s])
    day_set[s] = held < seed
    local used = day_set[s] and seed or held
    day_used[s] = used
    if used + tokens > tpd then return {0, s, 3, used, -1} end
  end
  if streams > 0 and stream_ms > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', int(now))
    local open = redis.call('ZCARD', KEYS[k + 4])
    if open >= streams then return {0, s, 4, open, -1} end
  end
end
local cap, cost = tonumber(ARGV[13]), tonumber(ARGV[15])
local spent, spend_set = 0, false
if cap > 0 then
  -- Never below the ledger's spend (the seed), for the same reason as the day's tokens.
  local held, seed = tonumber(redis.call('GET', KEYS[9]) or '-1'), tonumber(ARGV[14])
  spend_set = held < seed
  spent = spend_set and seed or held
  if spent + cost > cap then return {0, 3, 5, spent, -1} end
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
    if day_set[s] then
      redis.call('SET', KEYS[k + 3], int(day_used[s] + tokens), 'EX', ARGV[4])
    else
      redis.call('INCRBY', KEYS[k + 3], int(tokens))
      redis.call('EXPIRE', KEYS[k + 3], ARGV[4], 'NX')
    end
  end
  if l[4] > 0 and stream_ms > 0 then
    local held_ms = math.min(stream_ms, tonumber(ARGV[20]))
    redis.call('ZADD', KEYS[k + 4], int(now + held_ms), rid)
    if redis.call('PTTL', KEYS[k + 4]) < held_ms + 1000 then
      redis.call('PEXPIRE', KEYS[k + 4], held_ms + 1000)
    end
  end
end
if cap > 0 then
  if spend_set then
    redis.call('SET', KEYS[9], int(spent + cost), 'EX', ARGV[16])
  else
    redis.call('INCRBY', KEYS[9], int(cost))
  end
end
redis.call('SET', KEYS[10], '1', 'PX', ARGV[17])
return {1, now}
"""

# KEYS: stream zsets of one tenant (one hash slot). ARGV: lease ms, then per slot held
#   by this gateway: the index of its zset in KEYS, its reservation id, and the end of its
#   call in Redis's ms (reserve's time plus stream ms): a lease never runs past it.
# A slot whose member is gone (given back by SETTLE's ZREM) or whose lease has lapsed
#   (removed by RESERVE's prune, or about to be) is left alone: the existence check
#   here (with ZADD XX as well) is what keeps a given-back slot from being added again
#   by a renewal that races its settle; the marker is not consulted. Scores only grow
#   (GT), and the zset's TTL is kept beyond its furthest lease.
# Returns the reservation ids not renewed (given back, lapsed, or past their end), for
#   the gateway to stop renewing.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local function int(x) return string.format('%d', x) end
local gone, furthest = {}, {}
for i = 2, #ARGV, 3 do
  local k, rid, stop = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
  local score = tonumber(redis.call('ZSCORE', KEYS[k], rid) or '-1')
  local until_ms = math.min(now + lease, stop)
  if score > now and until_ms > now then
    if until_ms > score then
      redis.call('ZADD', KEYS[k], 'XX', 'GT', int(until_ms), rid)
      score = until_ms
    end
    if score > (furthest[k] or 0) then furthest[k] = score end
  else
    gone[#gone + 1] = rid
  end
end
for k, at in pairs(furthest) do
  if redis.call('PTTL', KEYS[k]) < at - now + 1000 then
    redis.call('PEXPIRE', KEYS[k], int(at - now + 1000))
  end
end
return gone
"""

# KEYS as RESERVE. ARGV: rid, tokens, tokens delta, cost delta, then per scope whether
# it holds a window entry, day tokens, a stream (5..10), whether spend was reserved (11),
# whether the reservation is known to have been made (12), marker ttl ms (13).
# Only a held marker is settled, once. A counter that has expired meanwhile is left
# alone, never recreated. A reservation not known to have been made leaves the minute
# window altogether: its caller heard UNAVAILABLE, so its request does not count.
# Returns 1 if it settled, 0 if there was nothing to settle.
SETTLE = """
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


def refusal(
    demand: Demand, reply: list[int], now: float, day_end: float, month_end: float
) -> Exception:
    """What a reserve that was refused (RESERVE's reply {0, ...}) tells the caller."""
    _, scope_no, quota_no, used, retry_ms = (int(value) for value in reply)
    if quota_no == 5:
        return over_spend_cap(demand.tenant, demand.spend_cap, used, demand.cost, month_end - now)
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
