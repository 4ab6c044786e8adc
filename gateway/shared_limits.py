"""Tenant limits shared by every gateway on one Redis: one request rate, one token rate and one
concurrency cap per tenant, however many gateways serve it.

Each gateway still applies a tenant's limits to its own traffic (:meth:`gateway.auth.Tenant.admit`,
no network), which can only refuse what the shared limits would refuse too, since its traffic
is part of everyone's. Then, for a tenant that has a limit and while Redis is up, one script
applies the same limits to the traffic of every gateway, atomically (as LiteLLM and Envoy's
rate-limit service do): the token buckets live in Redis, refilled by Redis' clock, and the
concurrency cap sums every live gateway's count of the tenant's requests in progress. A
request the shared limits refuse is given back to the local counters.

When the request ends, its tokens are charged to the shared token bucket and the gateway's
count is written again, off the request's path (a task; the answer is not held for it). While
Redis is down, only the local limits apply: each gateway then allows a tenant its full limits
(N gateways, up to N times the rate) rather than refusing work it cannot account for.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from gateway.auth import Tenant, TenantPolicy
from gateway.errors import RateLimited
from gateway.shared import PRELUDE, RedisLink

# ARGV[4..] tenant, count if admitted, cap (-1: none), request rate, its burst, token rate, its
# burst (rates 0: none). Returns {1} or {0, reason, ms to wait}.
_ADMIT = (
    PRELUDE
    + """
local tenant, count, cap = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local rps, rburst, tps, tburst = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
  tonumber(ARGV[10])
local active = P .. 'active:' .. tenant
if cap >= 0 then
  local others = 0
  local counts = redis.call('HGETALL', active)
  for i = 1, #counts, 2 do
    if counts[i] ~= gw then others = others + tonumber(counts[i + 1]) end
  end
  if others + count > cap then return {0, 'concurrency', 1000} end
end
local function level(key, rate, burst)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return burst end
  return math.min(burst, tonumber(v[1]) + (now - tonumber(v[2])) * rate / 1000)
end
local rkey, tkey = P .. 'requests:' .. tenant, P .. 'tokens:' .. tenant
local r, k
if rps > 0 then
  r = level(rkey, rps, rburst)
  if r < 1 then return {0, 'rate_limited', math.ceil((1 - r) * 1000 / rps)} end
end
if tps > 0 then
  k = level(tkey, tps, tburst)
  if k < 0 then return {0, 'rate_limited', math.ceil(-k * 1000 / tps)} end
end
if rps > 0 then
  redis.call('HSET', rkey, 'level', tostring(r - 1), 'at', now)
  redis.call('PEXPIRE', rkey, math.ceil(rburst * 1000 / rps) + 1000)
end
if tps > 0 then
  redis.call('HSET', tkey, 'level', tostring(k), 'at', now)
end
if cap >= 0 then
  redis.call('HSET', active, gw, count)
  own(active)
end
return {1}
"""
)

# ARGV[4..] tenant, count now, cap (-1: none), tokens used, token rate, its burst.
_DONE = (
    PRELUDE
    + """
local tenant, count, cap = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local tokens, tps, tburst = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
if cap >= 0 then
  local active = P .. 'active:' .. tenant
  if count > 0 then redis.call('HSET', active, gw, count); own(active)
  else redis.call('HDEL', active, gw) end
end
if tps > 0 and tokens > 0 then
  local key = P .. 'tokens:' .. tenant
  local v = redis.call('HMGET', key, 'level', 'at')
  local k = tburst
  if v[1] then k = math.min(tburst, tonumber(v[1]) + (now - tonumber(v[2])) * tps / 1000) end
  redis.call('HSET', key, 'level', tostring(k - tokens), 'at', now)
  -- Kept until the debt is repaid and the bucket full again, then it can go.
  redis.call('PEXPIRE', key, math.ceil((tburst - k + tokens) * 1000 / tps) + 1000)
end
return 1
"""
)


def _limited(policy: TenantPolicy) -> bool:
    return bool(policy.requests_per_s or policy.tokens_per_s or policy.max_concurrent)


def _cap(policy: TenantPolicy) -> int:
    return -1 if policy.max_concurrent is None else policy.max_concurrent


class Grant:
    """One admitted request's hold on its tenant's limits; :meth:`done` gives it back once."""

    __slots__ = ("_done", "_tenant")

    def __init__(self, tenant: Tenant, done: Callable[[Tenant, int], None] | None) -> None:
        self._tenant = tenant
        self._done = done

    @property
    def tenant(self) -> Tenant:
        return self._tenant

    def done(self, now: float, tokens: int) -> None:
        """The request ended having used ``tokens`` (prompt + completion)."""
        self._tenant.done(now, tokens)
        if self._done is not None:
            self._done(self._tenant, tokens)
            self._done = None


class SharedLimits:
    """Admits requests against their tenant's limits: this gateway's, and everyone's when a
    Redis link is given and up."""

    def __init__(
        self,
        clock: Callable[[], float],
        link: RedisLink | None = None,
        tenants: Callable[[], Iterable[Tenant]] = tuple,
    ) -> None:
        """``tenants`` lists the current keys' tenants (their counts are written back when
        Redis returns)."""
        self._clock = clock
        self._link = link
        self._tenants = tenants
        self._pending: set[asyncio.Task[object]] = set()
        if link is not None:
            self._admit = link.script(_ADMIT)
            self._done = link.script(_DONE)
            link.on_up(self._write_back)

    async def admit(self, tenant: Tenant) -> Grant:
        """Count one request against the tenant's limits; RateLimited if it is over one."""
        tenant.admit(self._clock())
        link, p = self._link, tenant.policy
        if link is None or not _limited(p):
            return Grant(tenant, None)
        if not link.up:  # admitted on local limits; its end is still written if Redis is back
            return Grant(tenant, self._release)
        rps, tps = p.requests_per_s or 0.0, p.tokens_per_s or 0.0
        try:
            answer = await link.call(
                self._admit,
                (p.name, tenant.active, _cap(p), rps, max(rps, 1.0), tps, max(tps, 1.0)),
            )
        except BaseException:
            tenant.undo_admit(self._clock())
            raise
        if answer is None or int(answer[0]) == 1:  # None: Redis went away, local limits hold
            return Grant(tenant, self._release)
        tenant.undo_admit(self._clock())
        reason = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
        wait_s = max(math.ceil(int(answer[2]) / 1000), 1)
        if reason == "concurrency":
            raise RateLimited(
                f"tenant {p.name} has {p.max_concurrent} requests in progress across the "
                "gateways (its limit)",
                code="concurrency",
                retry_after_s=wait_s,
            )
        raise RateLimited(
            f"tenant {p.name} is over its rate across the gateways; retry after {wait_s} s",
            code="rate_limited",
            retry_after_s=wait_s,
        )

    def _release(self, tenant: Tenant, tokens: int) -> None:
        link, p = self._link, tenant.policy
        if link is None or not link.up:
            return
        args = (p.name, tenant.active, _cap(p), tokens, p.tokens_per_s or 0.0)
        self._spawn(link.call(self._done, (*args, max(p.tokens_per_s or 0.0, 1.0))))

    async def _write_back(self) -> None:
        """After Redis returns: this gateway's count of each tenant's requests in progress."""
        assert self._link is not None
        for tenant in self._tenants():
            p = tenant.policy
            if p.max_concurrent is not None:
                await self._link.call(self._done, (p.name, tenant.active, _cap(p), 0, 0, 1))

    def _spawn(self, call: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(call)
        self._pending.add(task)  # held until done: a bare task may be collected mid-flight
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait for the writes still in flight (at shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
