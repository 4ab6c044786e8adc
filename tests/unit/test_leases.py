"""One upstream's window split between gateways through a real redis-server: exact (the
leases never add up to more than the window), fair when short, work conserving, and a dead
gateway's slots come back after its TTL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.leases import Leases
from gateway.shared import RedisLink
from gateway.tickets import Window
from tests.redis_server import RedisServer, redis_server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis.log") as server:
        yield server


class Gateway:
    """A gateway's window on the upstream "vllm:8000" and how many requests it has queued."""

    def __init__(self, url: str, size: int, ttl_s: float) -> None:
        self.window = Window("vllm:8000", size)
        self.queued = 0
        self.kicks = 0
        self.link = RedisLink(url, on_change=lambda up: None, ttl_s=ttl_s)
        self.leases = Leases(
            self.link, {self.window.name: self.window}, lambda: self.queued, self.kick
        )

    def kick(self) -> None:
        self.kicks += 1

    def run(self, n: int) -> None:
        """Dispatch ``n`` queued requests into held slots, as the scheduler would."""
        for _ in range(n):
            assert self.window.has_room(0)
            assert self.queued > 0
            self.window.inflight += 1
            self.queued -= 1

    async def sync(self, *, force: bool = True) -> int | None:
        """Sync now (by default even if not due: these tests follow the protocol step by
        step); the slots this gateway may fill."""
        await self.leases.sync_all(force=force)
        return self.window.lease


Make = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateways(redis: RedisServer) -> AsyncIterator[Make]:
    made: list[Gateway] = []

    async def make(size: int = 4, ttl_s: float = 5.0) -> Gateway:
        gw = Gateway(redis.url, size, ttl_s)
        await gw.link._reconnect()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.link.close()


async def test_a_lone_gateway_gets_the_window_and_keeps_idle_slots(gateways: Make) -> None:
    a = await gateways(size=4)
    a.queued = 6
    assert await a.sync() == 4  # want: at most the window
    a.run(4)
    assert not a.window.has_room(0)
    a.window.inflight, a.queued = 0, 0  # all finished, nothing waits
    assert await a.sync() == 4  # nobody else is short: kept, no round trip per request


async def test_two_short_gateways_converge_to_fair_shares_without_overshoot(
    gateways: Make,
) -> None:
    a, b = await gateways(size=4), await gateways(size=4)
    a.queued = 10
    assert await a.sync() == 4
    a.run(4)
    b.queued = 10
    assert await b.sync() == 0  # everything is held and running: nothing can be taken back
    assert b.window.shared == 4
    assert not b.window.has_room(0)
    assert await a.sync() == 2  # B is owed 2: A may fill 2, and keeps its 4 running
    a.window.inflight = 3  # one of A's finishes: its slot goes to B, not to A's queue
    assert not a.window.has_room(0)
    assert await a.sync() == 2
    assert await b.sync() == 1
    b.run(1)
    a.window.inflight = 2
    assert await a.sync() == 2
    assert await b.sync() == 2
    b.run(1)
    assert a.window.inflight + b.window.inflight == 4
    assert not a.window.has_room(0)
    assert not b.window.has_room(0)


async def test_a_gateway_owing_slots_refills_only_after_redis_has_them_back(
    gateways: Make,
) -> None:
    """Found by the process-level test on a loaded host: A got the whole window (B's
    requests came 20 ms later), all four of A's requests ended together, and A refilled its
    share from its queue at once, while its sync giving the rest back took seconds; Redis
    still counted A's 4, so B ran nothing until A's second round was over too."""
    a, b = await gateways(size=4), await gateways(size=4)
    a.queued = 6
    assert await a.sync() == 4
    a.run(4)
    b.queued = 6
    assert await b.sync() == 0
    assert await a.sync() == 2  # B is owed 2
    for _ in range(4):
        a.window.freed()
    assert not a.window.has_room(0)  # A may not refill before Redis has them back ...
    assert await b.sync() == 0  # ... where they are still A's until A syncs
    assert await a.sync() == 2
    assert await b.sync() == 2
    a.run(2)
    b.run(2)


async def test_slots_nobody_needs_go_to_whoever_wants_them(gateways: Make) -> None:
    a, b = await gateways(size=4), await gateways(size=4)
    a.queued = 1
    assert await a.sync() == 1
    b.queued = 10
    assert await b.sync() == 3  # A wants only one: work conserving
    a.queued = 0
    assert await a.sync() == 0  # A's slot is idle and B is short of its share: given back
    assert await b.sync() == 4


async def test_the_sum_of_leases_never_exceeds_the_window(gateways: Make) -> None:
    gws = [await gateways(size=5) for _ in range(3)]
    for round_ in range(30):  # demand comes and goes in a fixed pseudo-random pattern
        for i, gw in enumerate(gws):
            gw.queued = (round_ * 7 + i * 3) % 6
            await gw.sync()
            gw.run(min(gw.queued, max((gw.window.lease or 0) - gw.window.inflight, 0)))
            granted = sum(g.window.lease or 0 for g in gws)
            running = sum(g.window.inflight for g in gws)
            assert granted <= 5
            assert running <= 5
            if (round_ + i) % 2:
                gw.window.inflight = max(gw.window.inflight - 2, 0)


async def test_a_dead_gateways_slots_come_back_after_its_ttl(gateways: Make) -> None:
    crashed, other = await gateways(size=4, ttl_s=0.3), await gateways(size=4)
    crashed.queued = 4
    assert await crashed.sync() == 4
    crashed.run(4)  # and then it is SIGKILLed: no sync, no heartbeat, no goodbye
    other.queued = 4
    assert await other.sync() == 0
    started = time.monotonic()
    while await other.sync() != 4:
        assert time.monotonic() - started < 5, "the dead gateway's leases never expired"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.2


async def test_without_redis_the_whole_window_is_local(gateways: Make, redis: RedisServer) -> None:
    a = await gateways(size=4)
    a.queued = 1
    assert await a.sync() == 1
    redis.kill()
    a.queued = 3
    await a.sync()  # fails: the link goes down and the window is this gateway's again
    assert not a.link.up
    assert a.window.lease is None
    assert a.window.shared == 0
    assert a.kicks >= 2
    a.run(3)
    redis.start()
    await a.link._reconnect()
    assert a.link.up
    await a.sync()
    assert a.window.lease == 3  # what runs is held again


async def test_a_lone_gateway_does_not_sync_per_request(gateways: Make) -> None:
    a = await gateways(size=4)
    a.queued = 1
    assert await a.sync(force=False) == 1  # never synced: due
    synced = a.leases._synced_at[a.window.name]
    for _ in range(20):  # requests come and go within its lease, nobody else is short
        a.run(1)
        await a.sync(force=False)
        a.window.inflight, a.queued = 0, 1
        await a.sync(force=False)
    assert a.leases._synced_at[a.window.name] == synced  # no script ran (renewed only by time)
    a.queued = 3
    assert await a.sync(force=False) == 3  # short: asks at once
    b = await gateways(size=4)
    b.queued = 4
    assert await b.sync(force=False) == 1  # owed 2 (its share), A holds 3
    assert await a.sync(force=True) == 2  # its periodic sync: B is owed, A may fill 2 of 3
    a.run(2)
    a.window.inflight, a.queued = 1, 0  # one finishes, the last queued one is gone
    assert await a.sync(force=False) == 1  # due at once: B is owed
    assert await b.sync(force=False) == 3
