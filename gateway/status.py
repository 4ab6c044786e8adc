"""The status page's data: what the gateway is doing now and how each task did recently.

``GET /status.json`` is :func:`snapshot` of the runtime; ``GET /status`` is a static page
(``static/status.html``) that polls it. Queue depths, in-flight counts and upstream state are
read live. Per-task percentiles come from :class:`Recent`, a bounded ring of each task's
last finished requests fed by :func:`gateway.exchange.record` (through
``Metrics.on_request``), over the same population as ``gateway_request_duration_seconds``, so
the page and the dashboard agree. Prometheus remains the place for history and alerts.

What the gateway keeps about past requests is bounded, and ``bounds`` in the snapshot counts
it against its bound: the rings hold at most ``per_task`` requests per task name in the task
table (about 150 bytes each: 2,048 x 7 shipped tasks is ~2 MiB when all are full), which is
where a long soak's memory levels off only once every ring is full.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from gateway.metrics import REJECTION_REASONS, SERVED_OUTCOMES

if TYPE_CHECKING:  # the runtime holds a Recent; only the snapshot needs the runtime's type
    from gateway.runtime import Runtime

#: Outcomes that turned a request away before it reached an upstream.
REJECTED_OUTCOMES = ("rejected", "shed")


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
        since = now - self.horizon_s
        return [f for f in self._rings.get(task, ()) if f.at >= since]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (``q`` in 0..1); None if empty."""
    if not values:
        return None
    return values[min(max(math.ceil(q * len(values)) - 1, 0), len(values) - 1)]


def snapshot(rt: Runtime) -> dict[str, Any]:
    """Everything ``/status.json`` shows, read from the runtime now."""
    now = rt.dispatcher.now()
    config, scheduler = rt.config, rt.scheduler
    recent = {name: rt.recent.window(name, now) for name in config.tasks}
    return {
        "time": time.time(),
        "horizon_s": rt.recent.horizon_s,
        "queue": {
            "queued": scheduler.queued,
            "max_queued": scheduler.max_queued,
            "classes": [
                {"name": p.name, "depth": scheduler.depth(p.name), "max_queued": p.max_queued}
                for p in scheduler.classes.ordered
            ],
        },
        "upstreams": [_upstream(rt, name, now) for name in rt.upstreams.by_name],
        "tasks": [
            _task(task.name, task.priority_class, task.sla_latency_s, task.sla_ttft_s, done, now)
            for task, done in zip(config.tasks.values(), recent.values(), strict=True)
        ],
        "rejections": _rejections(rt, recent.values()),
        "bounds": {"recent": {"per_task": rt.recent.per_task, "kept": rt.recent.kept()}},
    }


def _upstream(rt: Runtime, name: str, now: float) -> dict[str, Any]:
    upstream, window = rt.upstreams[name], rt.scheduler.windows[name]
    load = rt.scraper.loads.get(name)
    vllm = None
    if load is not None:
        vllm = {
            "running": load.running,
            "waiting": load.waiting,
            "kv_cache_usage": load.kv_cache_usage,
            "age_s": _round(now - load.at),
        }
    return {
        "name": name,
        "up": upstream.up,
        "model": upstream.model,
        "error": upstream.last_error,
        "inflight": window.inflight,
        "window": window.size,
        "external": window.external,
        "vllm": vllm,
        "metrics_error": rt.scraper.errors.get(name),
    }


def _task(
    name: str,
    pclass: str,
    sla_latency_s: float,
    sla_ttft_s: float,
    done: list[Finished],
    now: float,
) -> dict[str, Any]:
    served = [f for f in done if f.outcome in SERVED_OUTCOMES]  # as the latency histograms
    durations = sorted(f.duration_s for f in served)
    ttfts = sorted(f.ttft_s for f in served if f.ttft_s is not None)
    outcomes: dict[str, int] = {}
    for f in done:
        outcomes[f.outcome] = outcomes.get(f.outcome, 0) + 1
    p95, ttft_p95 = percentile(durations, 0.95), percentile(ttfts, 0.95)
    return {
        "name": name,
        "priority_class": pclass,
        "sla_latency_s": sla_latency_s,
        "sla_ttft_s": sla_ttft_s,
        "requests": len(done),
        "span_s": _round(now - done[0].at) if done else 0.0,
        "outcomes": outcomes,
        "latency_p50_s": _round(percentile(durations, 0.5)),
        "latency_p95_s": _round(p95),
        "ttft_requests": len(ttfts),
        "ttft_p50_s": _round(percentile(ttfts, 0.5)),
        "ttft_p95_s": _round(ttft_p95),
        "latency_ok": None if p95 is None else p95 <= sla_latency_s,
        "ttft_ok": None if ttft_p95 is None else ttft_p95 <= sla_ttft_s,
    }


def _rejections(rt: Runtime, recent: Iterable[list[Finished]]) -> dict[str, Any]:
    """Rejections by reason: within the recent window, and since the gateway started."""
    window = dict.fromkeys(REJECTION_REASONS, 0)
    for done in recent:
        for f in done:
            if f.outcome in REJECTED_OUTCOMES and f.error_code is not None:
                window[f.error_code] = window.get(f.error_code, 0) + 1
    total = dict.fromkeys(REJECTION_REASONS, 0)
    for family in rt.metrics.rejections.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels["reason"]
                total[reason] = total.get(reason, 0) + int(sample.value)
    return {"recent": window, "total": total}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
