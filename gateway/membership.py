"""Adding, draining and forgetting one upstream in every part that knows of it.

An upstream lives in five places: the health checks (:class:`~gateway.upstreams.Upstreams`),
the scheduler's window, the window's sizing controller, the metrics scraper and the metric
series (and, read from those, the status page). :class:`Membership` is the one place that
changes all of them together, for :class:`gateway.roster.Roster`; the rules (when to add,
drain, forget) are the roster's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from gateway.metrics import Metrics
from gateway.roster import Member
from gateway.scheduler import Scheduler, Window
from gateway.scrape import Scraper
from gateway.sizing import Sizing
from gateway.upstreams import Upstreams
from gateway.upstreams_file import UrlEntry


def watch_upstream(metrics: Metrics, window: Window, upstreams: Upstreams) -> None:
    """Export the upstream's scrape-time gauges (in flight, window, breaker; its lease when
    the gateway shares windows through Redis)."""
    metrics.watch_inflight(window.name, partial(getattr, window, "inflight"))
    metrics.watch_window(window.name, partial(getattr, window, "size"))
    metrics.watch_breaker(window.name, partial(upstreams.breaker_state, window.name))
    if metrics.window_lease is not None:
        metrics.watch_lease(window.name, partial(lease_slots, window))


def lease_slots(window: Window) -> float:
    """The slots the window's lease lets this gateway fill; -1 while Redis is down."""
    return -1.0 if window.lease is None else float(window.lease)


class Membership:
    """The gateway's upstream set, as :class:`gateway.roster.Members` changes it."""

    def __init__(
        self,
        upstreams: Upstreams,
        scheduler: Scheduler,
        sizing: Sizing,
        scraper: Scraper,
        metrics: Metrics,
        kick: Callable[[], None],
    ) -> None:
        """``kick`` wakes the dispatcher (a window became usable again)."""
        self._upstreams = upstreams
        self._scheduler = scheduler
        self._sizing = sizing
        self._scraper = scraper
        self._metrics = metrics
        self._kick = kick

    def present(self) -> dict[str, Member]:
        return {name: Member(u.overflow, u.draining) for name, u in self._upstreams.by_name.items()}

    def add(self, name: str, target: UrlEntry) -> None:
        # Not usable until its health check passes (the health loop's on_change says so).
        window = Window(name, 1, usable=False, overflow=target.overflow)
        self._sizing.add(window)
        self._scheduler.windows[name] = window
        upstream = self._upstreams.add(target.url, overflow=target.overflow)
        self._scraper.add(upstream)
        self._metrics.preinitialise((), (), [name])
        watch_upstream(self._metrics, window, self._upstreams)

    def drain(self, name: str) -> None:
        self._upstreams[name].draining = True
        self._scheduler.windows[name].usable = False
        self._metrics.upstream_up.labels(name).set(0)

    def undrain(self, name: str, target: UrlEntry) -> None:
        upstream = self._upstreams[name]
        upstream.draining = False
        self.set_overflow(name, target.overflow)
        self._scheduler.windows[name].usable = upstream.usable
        self._metrics.upstream_up.labels(name).set(1 if upstream.usable else 0)
        self._kick()

    def set_overflow(self, name: str, overflow: bool) -> None:
        self._upstreams[name].overflow = overflow
        self._scheduler.windows[name].overflow = overflow
        self._kick()  # a new overflow flag can change where queued work may go

    def forget_drained(self) -> list[str]:
        """Forget every draining upstream with nothing left in flight; their names."""
        gone = [
            name
            for name, u in self._upstreams.by_name.items()
            if u.draining and self._scheduler.windows[name].inflight <= 0
        ]
        for name in gone:
            self._upstreams.forget(name)
            self._scheduler.windows.pop(name)  # nothing runs there: releases are done
            self._sizing.remove(name)
            self._scraper.remove(name)
            self._metrics.forget_upstream(name)
        return gone
