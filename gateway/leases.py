"""Each upstream's window, split between the gateways that share it (``--redis``).

Alone, a gateway puts at most its window on an upstream. Several gateways in front of one
vLLM would each do so, N windows in all, unless they agree. Here they agree through Redis,
on slot *leases*: a gateway dispatches to an upstream only into slots it holds
(:attr:`Window.lease`), and the slots every gateway holds never add up to more than the window.
So N gateways never put more on a vLLM than its window, exactly, whatever their timing; the
scraped estimate of other gateways' load (:mod:`gateway.scrape`, approximate at refill
boundaries) is kept only for clients that are not gateways.

A gateway asks for what it can use, ``want`` = in flight + queued (at most the window), and
one script grants it atomically:

- **Fair when short.** Every gateway's want is stored; the window is divided by water-filling
  (max-min fairness: nobody gets more than it wants, the rest split evenly). Slots another
  gateway is owed (its share, wanted and not yet held) are not granted to anyone else.
- **Work conserving.** Slots nobody is owed go to whoever wants them, and a gateway keeps
  idle slots while nobody else is short, so a lone gateway does not pay a Redis round trip
  per request.
- **Nothing running is taken back.** A gateway never holds fewer slots than it has requests
  in flight. When others are owed slots, the grant says how many it may fill (its
  :attr:`Window.lease`, possibly fewer than it runs): it dispatches no more until it is under
  that, so the slots its requests free go back instead of to its own queue. Nor does it
  refill a freed slot before a sync has given it back (:meth:`Window.freed`): Redis, not the
  first gateway to see it free, decides who gets it.

Leases are renewed by every sync: at once when a gateway is short, or when others are owed
slots and its load changed; every ``idle_s`` otherwise and expire with the gateway's liveness
(:mod:`gateway.shared`): a SIGKILLed gateway's slots come back within the TTL. While Redis is
down each gateway falls back to its whole window and the scraped estimate (``lease`` None).

With the adaptive window each gateway sizes the window from its own measurements; grants are
checked against the caller's size, so the sum of leases never exceeds the largest of the
gateways' sizes (all at most ``--window``, vLLM's ``--max-num-seqs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping

from gateway.shared import PRELUDE, RedisLink
from gateway.tickets import Window

# ARGV[4..] upstream, in flight, want, window size. Returns {slots the caller may fill, slots
# the others hold, slots others are owed}. The caller holds the larger of what it may fill and
# what it runs.
_SYNC = (
    PRELUDE
    + """
local up, inflight, want, size = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local hk, wk = P .. 'held:' .. up, P .. 'want:' .. up
redis.call('HSET', wk, gw, want)
own(wk)
local held, mine, others = {}, 0, 0
local h = redis.call('HGETALL', hk)
for i = 1, #h, 2 do
  local n = tonumber(h[i + 1])
  if h[i] == gw then mine = n else held[h[i]] = n; others = others + n end
end
local wants = {}
local w = redis.call('HGETALL', wk)
for i = 1, #w, 2 do wants[#wants + 1] = {g = w[i], n = tonumber(w[i + 1])} end
table.sort(wants, function(a, b) if a.n ~= b.n then return a.n < b.n end return a.g < b.g end)
local left, owed = size, 0
for i, e in ipairs(wants) do
  local share = math.min(e.n, math.floor(left / (#wants - i + 1)))
  left = left - share
  if e.g ~= gw then owed = owed + math.max(share - (held[e.g] or 0), 0) end
end
local keep = want
if owed == 0 then keep = math.max(want, mine) end
local may = math.max(math.min(keep, size - others - owed), 0)
local new = math.max(inflight, may)
if new > 0 then redis.call('HSET', hk, gw, new); own(hk) else redis.call('HDEL', hk, gw) end
return {may, others, owed}
"""
)


class Leases:
    """Keeps this gateway's slot leases on every upstream in step with what it needs.

    ``queued`` is how many requests wait in this gateway (any of them may go to any upstream);
    ``kick`` re-runs dispatch after a grant. Call :meth:`wake` whenever dispatch ran (a request
    queued, dispatched or finished): syncs are coalesced, one at a time per upstream.
    """

    def __init__(
        self,
        link: RedisLink,
        windows: Mapping[str, Window],
        queued: Callable[[], int],
        kick: Callable[[], None],
        *,
        idle_s: float = 0.25,
        short_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._windows = windows
        self._queued = queued
        self._kick = kick
        self._idle_s = idle_s
        self._short_s = short_s
        self._clock = clock
        self._script = link.script(_SYNC)
        self._woken = asyncio.Event()
        self._sent: dict[str, tuple[int, int, int]] = {}  # upstream: (in flight, want, size)
        self._synced_at: dict[str, float] = {}
        self._owed: dict[str, int] = {}  # upstream: slots the others are owed (last sync)
        link.on_down(self.local)
        link.on_up(self.wake)

    def wake(self) -> None:
        self._woken.set()

    async def run(self) -> None:
        """Sync forever (cancel to stop)."""
        while True:
            short = any(
                w.lease is not None and w.lease < self._want(w) for w in self._windows.values()
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._short_s if short else self._idle_s):
                    await self._woken.wait()
            self._woken.clear()
            if self._link.up:
                await self.sync_all()

    async def sync_all(self, *, force: bool = False) -> None:
        """Sync every window that is due (all of them with ``force``)."""
        windows = list(self._windows.values())
        await asyncio.gather(*(self._sync(w, force) for w in windows))

    async def sync(self, name: str) -> None:
        """Sync one upstream's window now (after a reading of its metrics: see
        :class:`gateway.scrape.Scraper`)."""
        window = self._windows.get(name)
        if window is not None and self._link.up:
            await self._sync(window, True)

    def local(self) -> None:
        """Redis is gone: every window is this gateway's again (with the scraped estimate)."""
        for window in self._windows.values():
            window.lease, window.shared, window.owing = None, 0, False
        self._sent.clear()
        self._kick()

    def _want(self, window: Window) -> int:
        return min(window.size, window.inflight + self._queued()) if window.usable else 0

    def _due(self, window: Window, state: tuple[int, int, int], now: float) -> bool:
        """Whether to sync now. Not on every request: a lone gateway would pay a script per
        dispatch and per release for nothing (measured: most of Redis' added cost)."""
        name = window.name
        if window.lease is None or now - self._synced_at.get(name, -math.inf) >= self._idle_s:
            return True  # (re)joined, or time to renew and to learn the others' wants
        if state[1] > window.lease:
            return True  # short: ask now (the others may have given slots back)
        # Others are owed slots: give back as soon as ours free up.
        return self._owed.get(name, 0) > 0 and state != self._sent.get(name)

    async def _sync(self, window: Window, force: bool) -> None:
        state = (window.inflight, self._want(window), window.size)
        now = self._clock()
        if not (force or self._due(window, state, now)):
            return
        self._sent[window.name], self._synced_at[window.name] = state, now
        answer = await self._link.call(self._script, (window.name, *state))
        if answer is None:  # Redis went away: local() has run, or will on the link's news
            return
        lease, shared, owed = (int(x) for x in answer)
        self._owed[window.name], window.owing = owed, owed > 0
        if (lease, shared) != (window.lease, window.shared):
            window.lease, window.shared = lease, shared
            self._kick()
