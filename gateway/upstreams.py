"""The upstream vLLM servers: where they are, which model they serve, whether they are usable.

An upstream is usable when it has answered a health check (so its model is known) and its
circuit breaker (:mod:`gateway.breaker`) is closed. Two sources feed the breaker:

- **passive**: the proxy reports each real request's outcome (:meth:`Upstreams.succeeded`,
  :meth:`Upstreams.failed`), so an upstream that refuses connections, answers 5xx or breaks
  off its streams stops getting work after a few failures in a row;
- **active**: a background loop polls each upstream's ``/health`` and ``/v1/models``. A busy
  vLLM on a loaded CPU can be slow to answer, so a failed check is one failure, not a verdict.
  While a breaker is open the loop leaves that upstream alone; when its cool-down ends, the
  next check is the half-open probe (the loop wakes for it) and decides.

An upstream that has never answered is *starting*: it is polled every interval and gets no
work, but its failures do not trip the breaker, so a gateway started before its vLLM sees it
as soon as it is up instead of after a growing cool-down. An upstream whose health check
finds nothing listening (connection refused) is starting again: vLLM died or is restarting
(serve.sh restarts it), polling a closed port costs nothing, and a cool-down doubling to 60 s
added up to a minute to the recovery after vLLM was back. Changes of usability are reported
through one callback, so this module knows nothing of windows or metrics.

The set can change while running (:mod:`gateway.roster`): :meth:`Upstreams.add` puts a new
upstream in as starting and wakes the loop to check it at once; a *draining* upstream (removed
from the upstreams file, its in-flight work still finishing) is not usable whatever its
health; :meth:`Upstreams.forget` drops it once it is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.breaker import Breaker, BreakerPolicy, BreakerState
from gateway.outbound import UpstreamClient, UpstreamUnavailable

log = logging.getLogger("gateway.upstreams")

CHECK_TIMEOUT_S = 5.0

#: How often a gateway polls while no upstream is usable and one is starting.
STARTING_INTERVAL_S = 0.5


@dataclass(slots=True)
class Upstream:
    """``name`` (host:port) is the metric label; ``model`` is the served model's id.

    ``up`` means healthy: answered a health check and its breaker is closed. ``usable`` also
    needs it not ``draining``. ``overflow`` marks cold capacity (see :mod:`gateway.roster`).
    """

    name: str
    base_url: str
    model: str | None = None
    up: bool = False
    last_error: str | None = None
    breaker: Breaker = field(default_factory=Breaker)
    overflow: bool = False
    draining: bool = False

    @property
    def usable(self) -> bool:
        return self.up and not self.draining

    @property
    def state(self) -> str:
        """For the status page and /ready: starting, up, down or draining."""
        if self.draining:
            return "draining"
        if self.up:
            return "up"
        return "starting" if self.model is None else "down"


def upstream_name(base_url: str) -> str:
    return base_url.split("://", 1)[-1].rstrip("/")


class Upstreams:
    def __init__(
        self,
        urls: Iterable[str],
        client: UpstreamClient,
        on_change: Callable[[Upstream], None],
        interval_s: float = 2.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        """``clock`` must be the clock of the event loop that runs the checks; ``breaker`` is
        the policy of every upstream's breaker."""
        policy = self._policy = breaker or BreakerPolicy()
        self.by_name = {
            upstream_name(url): Upstream(
                upstream_name(url), url.rstrip("/"), breaker=Breaker(policy)
            )
            for url in urls
        }
        self._client = client
        self._on_change = on_change
        self._interval_s = interval_s
        self._clock = clock
        self._tripped = asyncio.Event()

    def __getitem__(self, name: str) -> Upstream:
        return self.by_name[name]

    def any_up(self) -> bool:
        """Whether some upstream (primary or overflow, not draining) can take work."""
        return any(u.usable for u in self.by_name.values())

    def add(self, base_url: str, *, overflow: bool = False) -> Upstream:
        """A new upstream: starting (no work) until a health check, which happens now."""
        name = upstream_name(base_url)
        upstream = Upstream(name, base_url.rstrip("/"), breaker=Breaker(self._policy))
        upstream.overflow = overflow
        self.by_name[name] = upstream
        self._tripped.set()  # wake the loop: check it now, not an interval from now
        return upstream

    def forget(self, name: str) -> None:
        self.by_name.pop(name, None)

    def models(self) -> list[str]:
        return sorted({u.model for u in self.by_name.values() if u.model})

    def breaker_state(self, name: str) -> BreakerState:
        return self.by_name[name].breaker.state(self._clock())

    # -- passive: outcomes of real requests ------------------------------------------------

    def succeeded(self, name: str) -> None:
        """A real request got a proper answer (a client's 4xx included)."""
        upstream = self.by_name.get(name)
        if upstream is None:  # forgotten (drained) while the request was ending
            return
        upstream.breaker.success(self._clock())
        if not upstream.up:  # the hot path: nothing more to do while it is up
            self._update(upstream)

    def failed(self, name: str, error: str) -> None:
        """A real request failed through the upstream's fault (not the client's, not a deadline)."""
        upstream = self.by_name.get(name)
        if upstream is None:  # forgotten (drained) while the request was ending
            return
        upstream.last_error = error
        upstream.breaker.failure(self._clock())
        self._update(upstream)

    # -- active: the health loop -----------------------------------------------------------

    async def run(self) -> None:
        """Poll forever (cancel to stop): every interval, quickly while nothing is usable, and
        as soon as a breaker's cool-down ends."""
        while True:
            await self.check_all()
            self._tripped.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pause()):
                    await self._tripped.wait()  # a breaker opened: plan its probe

    def _pause(self) -> float:
        pause = self._interval_s
        if not self.any_up() and any(u.model is None for u in self.by_name.values()):
            pause = min(pause, STARTING_INTERVAL_S)  # waiting for the first upstream to start
        now = self._clock()
        for upstream in self.by_name.values():
            retry_at = upstream.breaker.retry_at
            if retry_at is not None and retry_at > now:
                pause = min(pause, retry_at - now)
        return pause

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.by_name.values()))

    async def check(self, upstream: Upstream) -> None:
        """One health check; while the breaker is half-open, the probe."""
        if upstream.breaker.state(self._clock()) is BreakerState.OPEN:
            return  # cooling down: the first check after the cool-down is the probe
        timeout = CHECK_TIMEOUT_S
        try:
            status, _ = await self._client.get(f"{upstream.base_url}/health", timeout)
            if status != 200:
                raise UpstreamUnavailable(f"/health answered {status}")
            status, body = await self._client.get(f"{upstream.base_url}/v1/models", timeout)
            model = _first_model(body) if status == 200 else None
            if model is None:
                raise UpstreamUnavailable(f"/v1/models answered {status} without a model")
        except UpstreamUnavailable as exc:
            upstream.last_error = exc.message
            if exc.refused:  # nothing listens: starting again (see the module's docstring)
                upstream.model = None
                upstream.breaker.reset()
            elif upstream.model is not None:  # a starting upstream is polled, never tripped
                upstream.breaker.failure(self._clock(), probe=True)
            self._update(upstream)
            return
        upstream.model = model
        upstream.breaker.success(self._clock(), probe=True)
        self._update(upstream)

    def _update(self, upstream: Upstream) -> None:
        if self.by_name.get(upstream.name) is not upstream:
            return  # forgotten while its check was under way: nobody listens for it
        now = self._clock()
        up = upstream.model is not None and upstream.breaker.state(now) is BreakerState.CLOSED
        if up:
            upstream.last_error = None
        if upstream.up == up:
            return
        upstream.up = up
        if up:
            log.info("upstream %s is up, serving %s", upstream.name, upstream.model)
        else:
            self._tripped.set()
            retry_at = upstream.breaker.retry_at
            if retry_at is None:  # not listening: polled every check until it answers
                log.warning(
                    "upstream %s is down (polling it): %s", upstream.name, upstream.last_error
                )
            else:
                log.warning(
                    "upstream %s is down (circuit open, next probe in %.1f s): %s",
                    upstream.name,
                    max(retry_at - now, 0.0),
                    upstream.last_error,
                )
        self._on_change(upstream)


def _first_model(body: bytes) -> str | None:
    try:
        data = json.loads(body).get("data") or []
        model = data[0].get("id")
    except (ValueError, AttributeError, IndexError, TypeError):
        return None
    return model if isinstance(model, str) else None
