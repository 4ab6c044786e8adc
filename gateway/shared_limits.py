"""Tenant limits shared by every gateway on one Redis: one request rate, one token rate and one
concurrency cap per tenant, however many gateways serve it.

Each gateway still applies a tenant's limits to its own traffic (:meth:`gateway.auth.Tenant.admit`,
no network), which can only refuse what the shared limits would refuse too, since its traffic
is part of everyone's. Then, for a tenant that has a limit and while Redis is up, one script
applies the same limits to the traffic of every gateway, atomically (as LiteLLM and Envoy's
rate-limit service do): the token buckets live in Redis, refilled by Redis' clock, and the
concurrency cap sums every live gateway's count of the tenant's slots. A request the shared
limits refuse is given back to the local counters.

A busy tenant does not cost a call per request: each call leases a share of the tenant's
limits for :data:`HOLD_S` (request credits, spare slots), and admissions the lease covers stay
local (see :class:`SharedLimits`). When a request ends, its tokens are charged to the shared
token bucket off the request's path: with the next call, or within :data:`ENDS_WAIT_S` (within
:data:`HOLD_S` while a lease holds the tenant, since the token rate may lag by a lease). While
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
from gateway.limits_script import LIMITS
from gateway.shared import RedisLink

#: Ends wait at most this long for an admission to ride on; then they go on their own.
ENDS_WAIT_S = 0.05

#: A lease on a tenant's shared limits lasts this long: admissions it covers make no call.
HOLD_S = 0.25


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


class _Lease:
    """What this gateway holds of one tenant's shared limits until ``until``: request credits
    taken from the shared bucket, slots counted in the shared cap beyond its requests in
    progress, and the shared token bucket's level when it was granted."""

    __slots__ = (
        "asked", "asking", "credits", "held", "level", "peak", "sent", "tenant", "timer",
        "until", "used",
    )  # fmt: skip

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.credits = 0  # taken from the shared request bucket, not used yet
        self.held = 0  # this gateway's count in the shared cap (>= its requests in progress)
        self.level = 0.0  # the shared token bucket at the last answer
        self.until = -math.inf
        self.used = 0  # admissions in this lease
        self.asked = 0  # credits the last call asked for
        self.peak = 0  # most requests in progress during this lease
        self.sent = 0  # which call's answer set held and level (the newest sent wins)
        self.timer: asyncio.TimerHandle | None = None
        # The call in flight for this tenant, if any. One at a time: two calls could reach
        # Redis in the other order, and the older count would overwrite the newer.
        self.asking: asyncio.Future[None] | None = None

    def covers(self, tenant: Tenant, now: float, debt: int) -> bool:
        """Whether one more request (already counted in ``tenant.active``) fits the lease."""
        p = tenant.policy
        return (
            now < self.until
            and (not p.requests_per_s or self.credits >= 1)
            and (p.max_concurrent is None or tenant.active <= self.held)
            and (not p.tokens_per_s or self.level - debt >= 0)
        )


class _End:
    """What the next call writes for one tenant: tokens its requests used, credits given back,
    and its count."""

    __slots__ = ("refund", "tenant", "tokens")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.tokens = 0
        self.refund = 0


class SharedLimits:
    """Admits requests against their tenant's limits: this gateway's, and everyone's when a
    Redis link is given and up.

    A Redis call costs the gateway about 0.1 ms of CPU (redis-py; measured), as much as the
    rest of a request's handling, and its round trip is on the request's path. So a gateway
    leases a share of a busy tenant's limits for :data:`HOLD_S`, as it leases window slots
    (:mod:`gateway.leases`): request credits taken from the shared bucket (twice what it used
    in its last lease, at most an eighth of a second of the tenant's rate), spare slots in the
    shared cap (as many as it has requests in progress, at most half of what is free), and the
    shared token bucket's level. Admissions the lease covers make no call. The limits stay
    exact where they are counts: credits and slots are taken from the shared ones, unused
    credits go back to the bucket and spare slots are given back when the lease ends. The
    token rate, checked on the bucket's level as tokens are charged after the fact, may lag
    by one lease. A tenant limited to a few requests a second gets one credit per call, which
    is the old behaviour: one call per request.

    A request's end (its tokens, the tenant's new count once no lease holds it) rides on the
    next call, or goes alone after at most :data:`ENDS_WAIT_S` (:data:`HOLD_S` if all it
    changes is the tokens charged while a lease holds the tenant).
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
        self._ends: dict[str, _End] = {}
        self._leases: dict[str, _Lease] = {}
        self._sent = 0
        self._timer: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[object]] = set()
        if link is not None:
            self._script = link.script(LIMITS)
            link.on_up(self._write_back)
            link.on_down(self._forget)

    @property
    def calls(self) -> int:
        """Admission calls made to Redis so far."""
        return self._sent

    async def admit(self, tenant: Tenant) -> Grant:
        """Count one request against the tenant's limits; RateLimited if it is over one."""
        now = self._clock()
        tenant.admit(now)
        link, p = self._link, tenant.policy
        if link is None or not _limited(p):
            return Grant(tenant, None)
        if not link.up:  # admitted on local limits; its end is still written if Redis is back
            return Grant(tenant, self._release)
        lease = self._leases.get(p.name)
        if lease is None:
            lease = self._leases[p.name] = _Lease(tenant)
        lease.tenant = tenant  # a keys reload makes new Tenant objects: count on the live one
        while True:
            end = self._ends.get(p.name)
            if lease.covers(tenant, now, end.tokens if end is not None else 0):
                if p.requests_per_s:
                    lease.credits -= 1
                lease.used += 1
                lease.peak = max(lease.peak, tenant.active)
                return Grant(tenant, self._release)
            if lease.asking is None:
                break
            try:  # the renewal in flight may cover this one too
                await asyncio.shield(lease.asking)
            except BaseException:
                tenant.undo_admit(self._clock())
                raise
            now = self._clock()
            if not link.up:
                return Grant(tenant, self._release)
        lease.asking = asyncio.get_running_loop().create_future()
        try:
            return await self._ask(tenant, lease)
        finally:
            lease.asking.set_result(None)
            lease.asking = None

    async def _ask(self, tenant: Tenant, lease: _Lease) -> Grant:
        """Admit through Redis, and take a new lease."""
        assert self._link is not None
        p = tenant.policy
        rps, tps = p.requests_per_s or 0.0, p.tokens_per_s or 0.0
        want = min(max(1, self._want(lease, self._clock())), max(1, int(rps * HOLD_S / 2)))
        lease.asked = want
        if lease.credits:  # given back with this call; the new lease takes what it needs
            self._end(tenant).refund += lease.credits
            lease.credits = 0
        n = tenant.active
        admission = (
            p.name, n, _cap(p), rps, max(rps, 1.0), tps, max(tps, 1.0),
            want, max(2, n, lease.peak),
        )  # fmt: skip
        self._sent += 1
        sent = self._sent
        try:
            answer = await self._link.call(self._script, (*self._take_ends(), *admission))
        except BaseException:
            tenant.undo_admit(self._clock())
            raise
        if answer is None:  # Redis went away: the local limits hold
            return Grant(tenant, self._release)
        if int(answer[0]) == 1:
            credits, spare = int(answer[1]), int(answer[2])
            lease.credits += credits - 1 if rps else 0
            if sent > lease.sent:  # an older call answering late must not undo a newer one
                lease.sent = sent
                lease.held = n + spare
                lease.level = float(answer[3])
            lease.used, lease.peak = 1, n
            lease.until = self._clock() + HOLD_S
            self._expire_later(lease)
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

    @staticmethod
    def _want(lease: _Lease, now: float) -> int:
        """How many credits to ask for: twice as many as last time if they ran out before the
        lease ended, as many if it is renewed for its slots or tokens, and twice what the
        last lease used if it ran out of time."""
        if now >= lease.until:
            return 2 * lease.used
        return 2 * lease.asked if lease.credits < 1 else lease.asked

    def _end(self, tenant: Tenant) -> _End:
        end = self._ends.get(tenant.name)
        if end is None:
            end = self._ends[tenant.name] = _End(tenant)
        return end

    def _expire_later(self, lease: _Lease) -> None:
        if lease.timer is None:
            loop = asyncio.get_running_loop()
            lease.timer = loop.call_at(loop.time() + HOLD_S, self._expire, lease)

    def _expire(self, lease: _Lease) -> None:
        """A lease ran out: give back its unused credits and spare slots, unless it was
        renewed meanwhile (then wait for the renewal's end)."""
        lease.timer = None
        left = lease.until - self._clock()
        if left > 0:
            loop = asyncio.get_running_loop()
            lease.timer = loop.call_at(loop.time() + left, self._expire, lease)
        else:
            self._return(lease)

    def _return(self, lease: _Lease) -> None:
        """Queue the lease's unused credits and spare slots to go back, if any (its end writes
        the tenant's count as its requests in progress, since the lease no longer holds more)."""
        if not (lease.credits or lease.held > lease.tenant.active):
            return
        end = self._end(lease.tenant)
        end.refund += lease.credits
        lease.credits = 0
        lease.held = 0
        self._write_soon()

    def _write_soon(self, within_s: float = ENDS_WAIT_S) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + within_s
        if self._timer is not None and self._timer.when() <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._flush)

    def _release(self, tenant: Tenant, tokens: int) -> None:
        p = tenant.policy
        lease = self._leases.get(p.name)
        held = lease is not None and self._clock() < lease.until
        counted = p.max_concurrent is not None and not held  # a held slot stays held
        charged = bool(p.tokens_per_s and tokens)
        if not (counted or charged):
            return  # nothing shared changes now
        self._end(tenant).tokens += tokens if charged else 0
        self._write_soon(ENDS_WAIT_S if counted else HOLD_S)

    def _take_ends(self) -> list[str | int | float]:
        """The ends waiting to be written, as the script's arguments (their count first)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        args: list[str | int | float] = [len(self._ends)]
        now = self._clock()
        for name, end in self._ends.items():
            p = end.tenant.policy  # the count is read now: the newest is the one to write
            lease = self._leases.get(name)
            count = end.tenant.active
            if lease is not None:
                lease.level -= end.tokens  # the lease's view of the bucket keeps our debt
                if now < lease.until:
                    count = max(count, lease.held)
            args += [
                name, count, _cap(p), end.tokens, p.tokens_per_s or 0.0,
                end.refund, p.requests_per_s or 0.0,
            ]  # fmt: skip
        self._ends.clear()
        return args

    def _flush(self) -> None:
        """No admission came to carry the ends: send them alone."""
        self._timer = None
        if self._link is not None and self._link.up and self._ends:
            self._spawn(self._link.call(self._script, self._take_ends()))

    def _forget(self) -> None:
        """Redis is gone: leases mean nothing now (the counts are written back on return)."""
        for lease in self._leases.values():
            if lease.timer is not None:
                lease.timer.cancel()
            lease.until = -math.inf
        self._leases.clear()

    async def _write_back(self) -> None:
        """After Redis returns: this gateway's count of each tenant's requests in progress."""
        assert self._link is not None
        for tenant in self._tenants():
            if tenant.policy.max_concurrent is not None:
                self._end(tenant)
        if self._ends:
            await self._link.call(self._script, self._take_ends())

    def _spawn(self, call: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(call)
        self._pending.add(task)  # held until done: a bare task may be collected mid-flight
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Give the leases back, send the ends still waiting, and wait for the writes in
        flight (at shutdown)."""
        for lease in self._leases.values():
            if lease.timer is not None:
                lease.timer.cancel()
                lease.timer = None
            lease.until = -math.inf
            self._return(lease)
        self._flush()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
