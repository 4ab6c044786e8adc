"""A circuit breaker per upstream: stop sending work to an upstream that keeps failing.

Pure logic with an explicit clock (every method takes ``now``), like the scheduler, so it is
tested without sleeps. :mod:`gateway.upstreams` owns one per upstream and feeds it.

    CLOSED ──N failures in a row──▶ OPEN ──cool-down ends──▶ HALF_OPEN ──probe fails──▶ OPEN
       ▲                                                       │           (cool-down doubles)
       └──────────────────────── probe succeeds ───────────────┘

- A **failure** is the upstream's fault: a refused or reset connection, a 5xx, garbage, or
  silence past the read timeout. A client's 4xx and the request's own deadline are not
  failures. A **success** is any proper answer, a 4xx included (the upstream is working).
- Real requests and health checks (``probe=True``) keep separate streaks; either reaching
  ``failures`` opens the breaker. A passing health check ends only the health checks'
  streak: it does not excuse failing requests (an upstream whose ``/health`` answers while
  its completions fail still trips). A real success ends both.
- While OPEN nothing is sent and nothing is learned: late answers to requests sent before
  the breaker opened neither shorten nor lengthen the cool-down.
- HALF_OPEN lets one probe through. In the gateway the probe is the health loop's next check,
  not a client's request, so no client waits on an upstream that may still be broken.
- The n-th trip in a row cools down for ``cooldown_s * 2**(n-1)``, capped at
  ``max_cooldown_s``. The trip count goes back to zero only when real traffic succeeds, not
  when a probe does: an upstream whose health check passes while its completions fail is
  retried less and less often instead of every ``cooldown_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class BreakerState(IntEnum):
    """The values are the ``gateway_upstream_breaker_state`` gauge's."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When to open and for how long, e.g. ``BreakerPolicy(failures=3, cooldown_s=5.0)``."""

    failures: int = 3
    cooldown_s: float = 5.0
    max_cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.cooldown_s <= 0 or self.max_cooldown_s < self.cooldown_s:
            raise ValueError(f"invalid breaker policy {self}")

    def cooldown(self, trips: int) -> float:
        """Seconds the ``trips``-th consecutive opening lasts."""
        return min(self.cooldown_s * 2.0 ** max(trips - 1, 0), self.max_cooldown_s)


class Breaker:
    """One upstream's breaker. Not thread-safe: one event loop owns it."""

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self.failures = 0  # consecutive failed requests while closed
        self.probe_failures = 0  # consecutive failed health checks while closed
        self.trips = 0  # consecutive openings without a real success in between
        self.retry_at: float | None = None  # when an open breaker turns half-open; None: closed

    def state(self, now: float) -> BreakerState:
        if self.retry_at is None:
            return BreakerState.CLOSED
        return BreakerState.HALF_OPEN if now >= self.retry_at else BreakerState.OPEN

    def success(self, now: float, *, probe: bool = False) -> None:
        """The upstream answered properly; ``probe`` for a health check, not real traffic."""
        state = self.state(now)
        if state is BreakerState.OPEN:
            return
        self.probe_failures = 0
        if state is BreakerState.HALF_OPEN:
            self.retry_at = None
            self.failures = 0
        if not probe:
            self.failures = self.trips = 0

    def reset(self) -> None:
        """Forget everything: closed, no streaks, no trips."""
        self.failures = self.probe_failures = self.trips = 0
        self.retry_at = None

    def failure(self, now: float, *, probe: bool = False) -> None:
        state = self.state(now)
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.CLOSED:
            if probe:
                self.probe_failures += 1
            else:
                self.failures += 1
            if max(self.failures, self.probe_failures) < self.policy.failures:
                return
        self.trips += 1
        self.failures = self.probe_failures = 0
        self.retry_at = now + self.policy.cooldown(self.trips)
