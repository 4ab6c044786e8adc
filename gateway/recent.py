"""Each task's recently finished requests, kept in bounded rings for the status page.

:func:`gateway.exchange.record` feeds :meth:`Recent.add` (through ``Metrics.on_request``)
once per request, over the same population as ``gateway_request_duration_seconds``, so the
page and the dashboard agree. The bound is ``per_task`` entries for each task in the task
table: memory stays flat however long the gateway runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple


class Finished(NamedTuple):
    """One finished request as the status page sees it. ``at`` is event-loop seconds."""

    at: float
    duration_s: float
    ttft_s: float | None
    outcome: str
    error_code: str | None


class Recent:
    """Each task's last ``per_task`` finished requests, read back over ``horizon_s``.

    ``add`` is O(1) and allocation-light because it runs once per request; the work (filter
    by age, sort for percentiles) happens when the status page asks, every few seconds. A
    busy task's window is therefore its last ``per_task`` requests if those span less than
    the horizon; :func:`snapshot` reports the span actually covered.
    """

    def __init__(self, per_task: int = 2048, horizon_s: float = 300.0) -> None:
        self.per_task = per_task
        self.horizon_s = horizon_s
        self._rings: dict[str, deque[Finished]] = {}

    def add(
        self,
        task: str,
        outcome: str,
        now: float,
        duration_s: float,
        ttft_s: float | None,
        error_code: str | None,
    ) -> None:
        ring = self._rings.get(task)
        if ring is None:  # task names come from the task table, so the dict stays small
            ring = self._rings[task] = deque(maxlen=self.per_task)
        ring.append(Finished(now, duration_s, ttft_s, outcome, error_code))

    def kept(self) -> dict[str, int]:
        """How many finished requests each task's ring holds now (at most ``per_task``)."""
        return {task: len(ring) for task, ring in self._rings.items()}

    def window(self, task: str, now: float) -> list[Finished]:
        """The task's requests that finished within the horizon, oldest first."""
        return self.since(task, now - self.horizon_s)

    def since(self, task: str, since: float) -> list[Finished]:
        """The task's requests that finished at or after ``since``, oldest first.

        Walks the ring from its newest end and stops at the first older request (the ring is
        in finishing order), so a short look back costs what it returns, not the whole ring.
        """
        found: list[Finished] = []
        for f in reversed(self._rings.get(task, ())):
            if f.at < since:
                break
            found.append(f)
        found.reverse()
        return found


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (``q`` in 0..1); None if empty."""
    if not values:
        return None
    return values[min(max(math.ceil(q * len(values)) - 1, 0), len(values) - 1)]
