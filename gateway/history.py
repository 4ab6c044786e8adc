"""The last minutes of the status page as a time series, kept in a bounded ring.

A background task (:meth:`Sampler.run`, started in the app's lifespan) takes one point every
``interval_s``; :class:`History` keeps the last ``span_s`` of them (``ceil(span_s /
interval_s)`` points, a few hundred bytes each), so memory is flat however long the gateway
runs and the request path pays nothing: the sampler reads what the gateway already keeps
(queue depths, windows, :class:`~gateway.recent.Recent`, the Prometheus counters). A point::

    {"t": 1234.5,                                    # event-loop seconds
     "queue": {"realtime": 0, "batch": 3, ...},       # waiting now, per class
     "upstreams": {"127.0.0.1:8000": {"inflight": 2, "window": 4}},
     "latency_p95_s": {"sentiment": 0.21, "chat": None, ...},   # over the last trailing_s
     "ttft_p95_s": {...},
     "rejections": {"queue_full": 0.0, ...},          # per second since the point before
     "deadlines": {"queue": 0.0, "dispatch": 0.0, "upstream": 0.0},
     "preemptions": {"batch": 0.5, ...}}

``GET /status.json?since=T`` sends only the points after ``T`` (the page asks for what it
has not seen yet), without ``since`` all of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from gateway.metrics import Metrics
from gateway.status import Status

log = logging.getLogger("gateway")


class History:
    """The last ``span_s`` of points taken every ``interval_s``; ``trailing_s`` is how far back
    each point's percentiles look.

    ``History(interval_s=2, span_s=600)`` keeps at most 300 points, the oldest dropped first.
    """

    def __init__(
        self, interval_s: float = 2.0, span_s: float = 600.0, trailing_s: float = 30.0
    ) -> None:
        if not 0 < interval_s <= span_s:
            raise ValueError(f"need 0 < interval_s <= span_s, got {interval_s}, {span_s}")
        self.interval_s, self.span_s, self.trailing_s = interval_s, span_s, trailing_s
        self.max_points = math.ceil(span_s / interval_s)
        self._points: deque[dict[str, Any]] = deque(maxlen=self.max_points)

    def __len__(self) -> int:
        return len(self._points)

    def add(self, point: dict[str, Any]) -> None:
        """Keep ``point`` (it has a ``t`` later than the last one's), dropping the oldest."""
        self._points.append(point)

    def since(self, t: float | None) -> list[dict[str, Any]]:
        """The points taken after ``t`` (all of them for None), oldest first."""
        if t is None:
            return list(self._points)
        newer: list[dict[str, Any]] = []
        for point in reversed(self._points):
            if point["t"] <= t:
                break
            newer.append(point)
        newer.reverse()
        return newer

    def report(self, now: float, since: float | None) -> dict[str, Any]:
        """What ``/status.json`` sends under ``history``."""
        return {
            "now": round(now, 3),
            "interval_s": self.interval_s,
            "span_s": self.span_s,
            "trailing_s": self.trailing_s,
            "max_points": self.max_points,
            "points": self.since(since),
        }


class Rates:
    """Per-second rates of a counter's series summed by one of its labels, between reads.

    The first read is against the totals when the object was built (a gateway's counters start
    at zero, so nothing before the sampler started is lost).
    """

    def __init__(self, counter: Counter, label: str, now: float) -> None:
        self._counter, self._label = counter, label
        self._totals, self._at = self._read(), now

    def read(self, now: float) -> dict[str, float]:
        totals, elapsed = self._read(), now - self._at
        rates = {
            key: round((value - self._totals.get(key, 0.0)) / elapsed, 4) if elapsed > 0 else 0.0
            for key, value in totals.items()
        }
        self._totals, self._at = totals, now
        return rates

    def _read(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for family in self._counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = sample.labels[self._label]
                    totals[key] = totals.get(key, 0.0) + sample.value
        return totals


class Sampler:
    """Takes the points of a :class:`History`; ``clock`` is the event loop's (as the status
    page's), injected so tests step it by hand."""

    def __init__(
        self, status: Status, metrics: Metrics, history: History, clock: Callable[[], float]
    ) -> None:
        self.history = history
        self._status, self._clock = status, clock
        now = clock()
        self._rates = {
            "rejections": Rates(metrics.rejections, "reason", now),
            "deadlines": Rates(metrics.deadline_exceeded, "stage", now),
            "preemptions": Rates(metrics.preemptions, "priority_class", now),
        }

    def sample(self) -> None:
        now = self._clock()
        point: dict[str, Any] = {"t": round(now, 3)}
        point.update(self._status.sample(now, self.history.trailing_s))
        for name, rates in self._rates.items():
            point[name] = rates.read(now)
        self.history.add(point)

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            try:
                self.sample()
            except Exception:  # a bug here must not stop the charts for good: say so, go on
                log.exception("status history: taking a point failed")
            await asyncio.sleep(self.history.interval_s)
