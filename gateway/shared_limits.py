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
count is written again, off the request's path: with the next admission's call, or within
:data:`ENDS_WAIT_S` (other gateways may see a count up to that old). While
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

# ARGV[4] n, then n ends of 5 arguments (tenant, its count now, cap or -1, tokens used, token
# rate or 0), then optionally one admission of 7 (tenant, count if admitted, cap or -1, request
# rate or 0, its burst, token rate or 0, its burst). Returns {1} (admitted, or nothing asked)
# or {0, reason, ms to wait}.
_LIMITS = (
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
  if cap >= 0 then count(tenant, n) end
  if tps > 0 and tokens > 0 then
    local key, burst = P .. 'tokens:' .. tenant, math.max(tps, 1)
    local k = level(key, tps, burst) - tokens
    redis.call('HSET', key, 'level', tostring(k), 'at', now)
    -- Kept until the debt is repaid and the bucket is full again; then it may go.
    redis.call('PEXPIRE', key, math.ceil((burst - k) * 1000 / tps) + 1000)
  end
  i = i + 5
end
if #ARGV < i then return {1} end
local tenant, n, cap = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
local rps, rburst = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
local tps, tburst = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
if cap >= 0 then
  local others, counts = 0, redis.call('HGETALL', P .. 'active:' .. tenant)
  for j = 1, #counts, 2 do
    if counts[j] ~= gw then others = others + tonumber(counts[j + 1]) end
  end
  if others + n > cap then return {0, 'concurrency', 1000} end
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
if tps > 0 then redis.call('HSET', tkey, 'level', tostring(k), 'at', now) end
if cap >= 0 then count(tenant, n) end
return {1}
"""
)

#: Ends wait at most this long for an admission to ride on; then they go on their own.
ENDS_WAIT_S = 0.05


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
    Redis link is given and up.

    A request's end (its tokens, the tenant's new count) is not a call of its own: it rides
    on the next admission's call, or goes alone after at most :data:`ENDS_WAIT_S`. A Redis call
    costs the gateway about 0.1 ms of CPU (redis-py; measured), as much as the rest of a
    request's handling, so one call per request rather than two.
    """

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
        self._ends: dict[str, tuple[Tenant, int]] = {}  # tenant: (its object, tokens used)
        self._timer: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[object]] = set()
        if link is not None:
            self._script = link.script(_LIMITS)
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
        admission = (p.name, tenant.active, _cap(p), rps, max(rps, 1.0), tps, max(tps, 1.0))
        try:
            answer = await link.call(self._script, (*self._take_ends(), *admission))
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
        p = tenant.policy
        if p.max_concurrent is None and not (p.tokens_per_s and tokens):
            return  # nothing shared changes
        _, used = self._ends.get(p.name, (tenant, 0))
        self._ends[p.name] = (tenant, used + tokens)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ENDS_WAIT_S, self._flush)

    def _take_ends(self) -> list[str | int | float]:
        """The ends waiting to be written, as the script's arguments (their count first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        args: list[str | int | float] = [len(self._ends)]
        for name, (tenant, tokens) in self._ends.items():
            p = tenant.policy  # the count is read now: the newest is the one to write
            args += [name, tenant.active, _cap(p), tokens, p.tokens_per_s or 0.0]
        self._ends.clear()
        return args

    def _flush(self) -> None:
        """No admission came to carry the ends: send them alone."""
        self._timer = None
        if self._link is not None and self._link.up and self._ends:
            self._spawn(self._link.call(self._script, self._take_ends()))

    async def _write_back(self) -> None:
        """After Redis returns: this gateway's count of each tenant's requests in progress."""
        assert self._link is not None
        for tenant in self._tenants():
            if tenant.policy.max_concurrent is not None:
                self._ends.setdefault(tenant.name, (tenant, 0))
        if self._ends:
            await self._link.call(self._script, self._take_ends())

    def _spawn(self, call: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(call)
        self._pending.add(task)  # held until done: a bare task may be collected mid-flight
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Send the ends still waiting, and wait for the writes in flight (at shutdown)."""
        self._flush()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
