"""The Redis side of the tenant limits shared between gateways (:mod:`gateway.shared_limits`):
one Lua script, so that checking the limits and taking from them is atomic, on Redis' clock.

Called with the prelude's arguments (:data:`gateway.shared.PRELUDE`), then, from ARGV[4], the
count of ends that follow, the ends, and optionally one admission (see :data:`LIMITS`).
"""

from gateway.shared import PRELUDE

#: ARGV[4] n, then n ends of 7 arguments (tenant, its count now, cap or -1, tokens used, token
#: rate or 0, request credits given back, request rate or 0), then optionally one admission of
#: 9 (tenant, count if admitted, cap or -1, request rate or 0, its burst, token rate or 0, its
#: burst, request credits wanted, spare slots wanted). Returns {1, credits, spare, token level}
#: (admitted, or nothing asked) or {0, reason, ms to wait}.
LIMITS = (
    PRELUDE
    + """
local function level(key, rate, burst)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return burst end
  return math.min(burst, tonumber(v[1]) + (now - tonumber(v[2])) * rate / 1000)
end
local function count(tenant, n)
  local active = P .. 'active:' .. tenant
  if n > 0 then redis.call('HSET', active, gw, n); own(active)
  else redis.call('HDEL', active, gw) end
end
local ends, i = tonumber(ARGV[4]), 5
for _ = 1, ends do
  local tenant, n, cap = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local tokens, tps = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local refund, rps = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  if cap >= 0 then count(tenant, n) end
  if tps > 0 and tokens > 0 then
    local key, burst = P .. 'tokens:' .. tenant, math.max(tps, 1)
    local k = level(key, tps, burst) - tokens
    redis.call('HSET', key, 'level', tostring(k), 'at', now)
    -- Kept until the debt is repaid and the bucket is full again; then it may go.
    redis.call('PEXPIRE', key, math.ceil((burst - k) * 1000 / tps) + 1000)
  end
  if rps > 0 and refund > 0 then
    local key, burst = P .. 'requests:' .. tenant, math.max(rps, 1)
    local r = math.min(burst, level(key, rps, burst) + refund)
    redis.call('HSET', key, 'level', tostring(r), 'at', now)
  end
  i = i + 7
end
if #ARGV < i then return {1, 0, 0, '0'} end
local tenant, n, cap = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
local rps, rburst = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
local tps, tburst = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
local want_r, want_s = tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8])
local spare, credits = 0, 0
if cap >= 0 then
  local others, counts = 0, redis.call('HGETALL', P .. 'active:' .. tenant)
  for j = 1, #counts, 2 do
    if counts[j] ~= gw then others = others + tonumber(counts[j + 1]) end
  end
  if others + n > cap then return {0, 'concurrency', 1000} end
  -- Spare slots: at most half of what is still free, so other gateways find room too.
  spare = math.min(want_s, math.floor((cap - others - n) / 2))
end
local rkey, tkey = P .. 'requests:' .. tenant, P .. 'tokens:' .. tenant
local r, k
if rps > 0 then
  r = level(rkey, rps, rburst)
  if r < 1 then return {0, 'rate_limited', math.ceil((1 - r) * 1000 / rps)} end
  credits = math.max(1, math.min(want_r, math.floor(r)))
end
if tps > 0 then
  k = level(tkey, tps, tburst)
  if k < 0 then return {0, 'rate_limited', math.ceil(-k * 1000 / tps)} end
end
if rps > 0 then
  redis.call('HSET', rkey, 'level', tostring(r - credits), 'at', now)
  redis.call('PEXPIRE', rkey, math.ceil(rburst * 1000 / rps) + 1000)
end
if tps > 0 then redis.call('HSET', tkey, 'level', tostring(k), 'at', now) end
if cap >= 0 then count(tenant, n + spare) end
return {1, credits, spare, tostring(k or 0)}
"""
)
