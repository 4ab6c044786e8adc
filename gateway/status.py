"""The status page's data: what the gateway is doing now and how each task did recently.

``GET /status.json`` is :func:`snapshot` of the runtime plus the last minutes of
:meth:`Status.sample` points (:mod:`gateway.history`); ``GET /status`` is a static page
(``static/status.html``) that polls it and draws both. Queue depths, in-flight counts and
upstream state are read live. Per-task percentiles come from
:class:`~gateway.recent.Recent`. Prometheus remains the place for long history and alerts.

What the gateway keeps about past requests is bounded, and ``bounds`` in the snapshot counts
it against its bound: the rings hold at most ``per_task`` requests per task name in the task
table (about 150 bytes each: 2,048 x 7 shipped tasks is ~2 MiB when all are full), which is
where a long soak's memory levels off only once every ring is full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

from gateway.config import Config
from gateway.metrics import REJECTION_REASONS, SERVED_OUTCOMES
from gateway.recent import Finished, Recent, percentile
from gateway.scheduler import Scheduler
from gateway.scrape import Scraper
from gateway.upstreams import Upstreams

#: Outcomes that turned a request away before it reached an upstream.
REJECTED_OUTCOMES = ("rejected", "shed")


class Status:
    """What ``/status.json`` reads, handed over once; :meth:`snapshot` reads it now."""

    def __init__(
        self,
        config: Callable[[], Config],
        scheduler: Scheduler,
        upstreams: Upstreams,
        scraper: Scraper,
        recent: Recent,
        rejections: Counter,
        clock: Callable[[], float],
    ) -> None:
        self._config = config  # a reload swaps the table: read it when asked
        self._scheduler = scheduler
        self._upstreams = upstreams
        self._scraper = scraper
        self._recent = recent
        self._rejections = rejections
        self._clock = clock

    def snapshot(self) -> dict[str, Any]:
        """Everything ``/status.json`` shows, read now."""
        return _snapshot(self, self._clock())

    def sample(self, now: float, trailing_s: float) -> dict[str, Any]:
        """The gauges of one point of the status history (:mod:`gateway.history`): queue depth
        per class, in flight and window per upstream, and each task's p95 latency and TTFT
        over the requests that finished in the last ``trailing_s`` (None: none did)."""
        scheduler, latency, ttft = self._scheduler, {}, {}
        for name in self._config().tasks:
            done = self._recent.since(name, now - trailing_s)
            served = [f for f in done if f.outcome in SERVED_OUTCOMES]
            latency[name] = _round(percentile(sorted(f.duration_s for f in served), 0.95))
            ttfts = sorted(f.ttft_s for f in served if f.ttft_s is not None)
            ttft[name] = _round(percentile(ttfts, 0.95))
        return {
            "queue": {p.name: scheduler.depth(p.name) for p in scheduler.classes.ordered},
            "upstreams": {
                name: {"inflight": w.inflight, "window": w.size}
                for name, w in scheduler.windows.items()
            },
            "latency_p95_s": latency,
            "ttft_p95_s": ttft,
        }


def _snapshot(st: Status, now: float) -> dict[str, Any]:
    config, scheduler = st._config(), st._scheduler
    recent = {name: st._recent.window(name, now) for name in config.tasks}
    return {
        "time": time.time(),
        "horizon_s": st._recent.horizon_s,
        "queue": {
            "queued": scheduler.queued,
            "max_queued": scheduler.max_queued,
            "classes": [
                {
                    "name": p.name,
                    "depth": scheduler.depth(p.name),
                    "max_queued": p.max_queued,
                    # Each tenant's fraction of the class's token service, last minute (keys).
                    "shares": {
                        t: round(f, 3) for t, f in scheduler.ledgers()[p.name].shares(now).items()
                    },
                }
                for p in scheduler.classes.ordered
            ],
            "expiry_timers": scheduler.timer_entries,
        },
        "upstreams": [_upstream(st, name, now) for name in st._upstreams.by_name],
        "tasks": [
            _task(task.name, task.priority_class, task.sla_latency_s, task.sla_ttft_s, done, now)
            for task, done in zip(config.tasks.values(), recent.values(), strict=True)
        ],
        "rejections": _rejections(st._rejections, recent.values()),
        "bounds": {"recent": {"per_task": st._recent.per_task, "kept": st._recent.kept()}},
    }


def _upstream(st: Status, name: str, now: float) -> dict[str, Any]:
    upstream, window = st._upstreams[name], st._scheduler.windows[name]
    load = st._scraper.loads.get(name)
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
        "up": upstream.usable,
        "state": upstream.state,  # starting, up, down or draining
        "overflow": upstream.overflow,
        "model": upstream.model,
        "error": upstream.last_error,
        "inflight": window.inflight,
        "window": window.size,
        "external": window.external,
        "vllm": vllm,
        "metrics_error": st._scraper.errors.get(name),
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


def _rejections(rejections: Counter, recent: Iterable[list[Finished]]) -> dict[str, Any]:
    """Rejections by reason: within the recent window, and since the gateway started."""
    window = dict.fromkeys(REJECTION_REASONS, 0)
    for done in recent:
        for f in done:
            if f.outcome in REJECTED_OUTCOMES and f.error_code is not None:
                window[f.error_code] = window.get(f.error_code, 0) + 1
    total = dict.fromkeys(REJECTION_REASONS, 0)
    for family in rejections.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels["reason"]
                total[reason] = total.get(reason, 0) + int(sample.value)
    return {"recent": window, "total": total}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
