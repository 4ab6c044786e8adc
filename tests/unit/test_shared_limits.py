"""Tenant limits shared through a real redis-server by two in-process "gateways" (two links
with their own ids, as two processes would have)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.auth import Tenant, TenantPolicy
from gateway.errors import RateLimited
from gateway.shared import RedisLink
from gateway.shared_limits import Grant, SharedLimits
from tests.redis_server import RedisServer, redis_server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis.log") as server:
        yield server


class Gateway:
    """One gateway's view: its link, its limits, its own Tenant objects (local counters)."""

    def __init__(self, url: str, policy: TenantPolicy, ttl_s: float = 5.0) -> None:
        self.changes: list[bool] = []
        self.link = RedisLink(url, on_change=self.changes.append, ttl_s=ttl_s, timeout_s=0.5)
        self.tenant = Tenant.of(policy)
        self.limits = SharedLimits(time.monotonic, self.link, lambda: [self.tenant])

    async def connect(self) -> None:
        await self.link._reconnect()
        assert self.link.up

    async def admit(self) -> Grant:
        return await self.limits.admit(self.tenant)


Make = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def pair(redis: RedisServer) -> AsyncIterator[Make]:
    gateways: list[Gateway] = []

    async def make(policy: TenantPolicy, ttl_s: float = 5.0) -> Gateway:
        gw = Gateway(redis.url, policy, ttl_s)
        await gw.connect()
        gateways.append(gw)
        return gw

    yield make
    for gw in gateways:
        await gw.limits.drain()
        await gw.link.close()


async def test_a_request_rate_holds_across_gateways(pair: Make) -> None:
    policy = TenantPolicy("acme", requests_per_s=2)  # burst: one second's worth, 2
    a, b = await pair(policy), await pair(policy)
    await a.admit()
    await b.admit()
    for gw in (a, b):  # each gateway alone has used 1 of its 2: only the shared bucket says no
        with pytest.raises(RateLimited) as refused:
            await gw.admit()
        assert refused.value.code == "rate_limited"
        assert refused.value.headers["Retry-After"] == "1"
        assert gw.tenant.active == 1  # the refused request was given back locally


async def test_the_concurrency_cap_counts_every_gateway(pair: Make) -> None:
    policy = TenantPolicy("acme", max_concurrent=2)
    a, b = await pair(policy), await pair(policy)
    held = [await a.admit(), await b.admit()]
    with pytest.raises(RateLimited) as refused:
        await b.admit()
    assert refused.value.code == "concurrency"
    held[0].done(time.monotonic(), 10)  # A's request ends: its slot is free for B
    await a.limits.drain()
    held.append(await b.admit())
    assert (a.tenant.active, b.tenant.active) == (0, 2)


async def test_tokens_used_at_one_gateway_limit_the_other(pair: Make) -> None:
    policy = TenantPolicy("acme", tokens_per_s=10)  # burst 10
    a, b = await pair(policy), await pair(policy)
    (await a.admit()).done(time.monotonic(), 50)  # 40 tokens of debt: 4 s at 10/s
    await a.limits.drain()
    with pytest.raises(RateLimited) as refused:
        await b.admit()
    assert refused.value.code == "rate_limited"
    assert 3 <= int(refused.value.headers["Retry-After"]) <= 4
    assert b.tenant.tokens is not None
    assert b.tenant.tokens.level == 10


async def test_a_dead_gateways_share_comes_back_after_its_ttl(pair: Make) -> None:
    policy = TenantPolicy("acme", max_concurrent=1)
    crashed, other = await pair(policy, ttl_s=0.3), await pair(policy)
    await crashed.admit()  # and then it dies: no done, no heartbeat, no goodbye
    with pytest.raises(RateLimited):
        await other.admit()
    deadline = time.monotonic() + 5
    while True:  # the TTL is 0.3 s; allow for a slow machine, but not forever
        try:
            await other.admit()
            break
        except RateLimited:
            assert time.monotonic() < deadline, "the dead gateway's count never expired"
            await asyncio.sleep(0.05)
    assert time.monotonic() - (deadline - 5) >= 0.25


async def test_without_redis_the_local_limits_hold_and_it_rejoins(
    pair: Make, redis: RedisServer
) -> None:
    policy = TenantPolicy("acme", max_concurrent=2)
    a, b = await pair(policy), await pair(policy)
    grant_b = await b.admit()
    redis.kill()
    first = await a.admit()  # the call fails: the link goes down, the local limits decide
    assert not a.link.up
    assert a.changes == [True, False]
    second = await a.admit()  # no Redis call now, and only A's own 2 count
    with pytest.raises(RateLimited):
        await a.admit()
    redis.start()
    await a.link._reconnect()  # what the link's loop does every second
    assert a.link.up
    assert a.changes == [True, False, True]
    await b.link._reconnect()
    # A wrote its count back on rejoining (2 in progress), so with B's one the cap is full.
    del grant_b
    assert a.tenant.active == 2
    with pytest.raises(RateLimited):
        await b.admit()
    first.done(time.monotonic(), 0)
    second.done(time.monotonic(), 0)
    await a.limits.drain()
    await b.admit()


async def test_a_lease_covers_a_busy_tenants_admissions_without_a_call(pair: Make) -> None:
    """A call per request would put a Redis round trip on every request's path: each call
    leases credits (twice what the last lease used) and spare slots, and admissions inside the
    lease make no call."""
    policy = TenantPolicy("acme", requests_per_s=1000, max_concurrent=100, tokens_per_s=10**6)
    a, b = await pair(policy), await pair(policy)
    for _ in range(31):
        (await a.admit()).done(time.monotonic(), 10)
    # 1 + 2 + 4 + 8 + 16 credits: five calls, unless a lease ran out on a slow machine.
    assert 5 <= a.limits.calls <= 10
    await b.admit()
    assert b.limits.calls == 1


async def test_concurrent_admissions_wait_for_the_call_in_flight(pair: Make) -> None:
    policy = TenantPolicy("acme", max_concurrent=100)
    a = await pair(policy)
    await a.admit()  # 1 in progress, 2 spare slots
    grants = await asyncio.gather(*(a.admit() for _ in range(6)))
    # The first beyond the lease asks for as many spare slots as it has requests in
    # progress; the others find room in that answer instead of calling too.
    assert len(grants) == 6
    assert a.limits.calls == 2


async def test_a_leases_spare_slots_go_back_when_it_ends(pair: Make) -> None:
    """Spare slots count against the shared cap (that keeps it exact), so another gateway may
    be refused while they are unused, but only until the lease ends."""
    policy = TenantPolicy("acme", max_concurrent=10)
    a, b = await pair(policy), await pair(policy)
    (await a.admit()).done(time.monotonic(), 0)  # held: 1 + 2 spare, until the lease ends
    held = [await b.admit() for _ in range(7)]
    with pytest.raises(RateLimited):
        await b.admit()  # 10 - A's 3
    deadline = time.monotonic() + 5
    while True:  # within HOLD_S + ENDS_WAIT_S, A gives its 3 back
        try:
            held.append(await b.admit())
            break
        except RateLimited:
            assert time.monotonic() < deadline, "A's spare slots never came back"
            await asyncio.sleep(0.02)
    while len(held) < 10:
        held.append(await b.admit())
    with pytest.raises(RateLimited):
        await b.admit()
    assert b.tenant.active == 10


async def test_a_leases_unused_credits_go_back_to_the_bucket(pair: Make) -> None:
    policy = TenantPolicy("acme", requests_per_s=32)  # up to 4 credits a lease
    a, b = await pair(policy), await pair(policy)
    for _ in range(4):  # calls for 1, 2 and 4 credits: 7 taken, 3 unused
        await a.admit()
    assert a.limits.calls == 3

    async def bucket() -> tuple[float, int]:  # its level, and when that was (Redis' ms)
        raw = await b.link._client.hmget("qwen-gateway:requests:acme", "level", "at")
        return float(raw[0]), int(raw[1])

    before, at = await bucket()
    await a.limits.drain()  # ends the lease
    after, then = await bucket()
    assert then > at or after != before, "nothing was written"
    assert after == pytest.approx(min(32.0, before + (then - at) * 32 / 1000 + 3), abs=0.05)


async def test_tokens_charged_while_a_lease_holds_count_against_it(pair: Make) -> None:
    """The lease keeps the shared token bucket's level; tokens this gateway charged since,
    written or not, are taken from that view, or it would admit on a level gone by."""
    policy = TenantPolicy("acme", tokens_per_s=100)  # burst 100
    a, b = await pair(policy), await pair(policy)
    (await b.admit()).done(time.monotonic(), 80)
    await b.limits.drain()
    (await a.admit()).done(time.monotonic(), 100)  # the lease saw about 20 left
    a.limits._flush()  # written now (as with another tenant's call), the lease still on
    await asyncio.gather(*a.limits._pending)
    with pytest.raises(RateLimited) as refused:  # A's own bucket is not below 0: Redis says no
        await a.admit()  # not covered: about 20 less our 100 (refilling at 100/s)
    assert refused.value.code == "rate_limited"
    assert a.limits.calls == 2


async def test_a_lease_counts_on_the_tenant_object_of_the_latest_admission(pair: Make) -> None:
    """A keys reload makes new Tenant objects: when the lease ends, the count written back is
    the live object's, not the one the lease began with."""
    policy = TenantPolicy("acme", max_concurrent=10)
    a, b = await pair(policy), await pair(policy)
    await a.admit()  # the first object: 1 in progress, 2 spare slots held
    a.tenant = Tenant.of(policy)  # reloaded
    held = [await a.admit() for _ in range(3)]  # the new object: 3 in progress
    await a.limits.drain()  # the lease ends: A's count stays the live object's 3
    held += [await b.admit() for _ in range(7)]
    with pytest.raises(RateLimited):  # not 9 for B, as a count of the old object's 1 would give
        await b.admit()


async def test_a_requests_end_is_written_within_the_wait(pair: Make) -> None:
    """An end the next call does not carry goes alone within ENDS_WAIT_S: the tokens used at
    one gateway limit the other soon after."""
    policy = TenantPolicy("acme", tokens_per_s=100)
    a, b = await pair(policy), await pair(policy)
    (await a.admit()).done(time.monotonic(), 500)  # 400 tokens of debt
    deadline = time.monotonic() + 5
    while True:
        try:
            await b.admit()  # B's own lease may cover it until it ends: then B asks
        except RateLimited:
            break
        assert time.monotonic() < deadline, "A's tokens were never charged"
        await asyncio.sleep(0.05)


async def test_a_timeout_is_not_an_outage_unless_a_probe_confirms_it(
    redis: RedisServer,
) -> None:
    """A call that times out goes local; Redis is declared down only if a probe right after
    times out too (a gateway's own event loop can stall past the timeout on a loaded host)."""
    changes: list[bool] = []
    link = RedisLink(redis.url, on_change=changes.append, timeout_s=0.2)
    limits = SharedLimits(time.monotonic, link)
    tenant = Tenant.of(TenantPolicy("acme", requests_per_s=100))
    await link._reconnect()
    assert redis.process is not None
    try:
        redis.process.send_signal(signal.SIGSTOP)  # Redis stops answering for a moment
        await limits.admit(tenant)  # times out: admitted on local limits
        redis.process.send_signal(signal.SIGCONT)
        assert link._probe is not None
        await link._probe
        assert link.up
        assert changes == [True]
        redis.process.send_signal(signal.SIGSTOP)  # and now for good
        await limits.admit(tenant)
        assert link._probe is not None
        await link._probe  # times out too: down
        assert not link.up
        assert changes == [True, False]
    finally:
        redis.process.send_signal(signal.SIGCONT)
    await link._reconnect()
    assert changes == [True, False, True]
    await link.close()
