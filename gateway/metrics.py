"""Prometheus metrics: the names are a contract (see the README's metric table).

One registry per gateway instance, built in the lifespan, never the global default one, so
tests can build as many gateways as they like. Every label value is bounded and known up
front: task and class names from the task table, upstream names from the settings, and the
fixed outcome and reason vocabularies below. Series are pre-initialised so dashboards and
alerts see zeros instead of gaps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets for LLM work: milliseconds (a label) to minutes (a long batch generation).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip

#: How a request ended (the ``outcome`` label).
OUTCOMES = (
    "ok", "client_error", "rejected", "shed", "deadline", "upstream_error", "cancelled",
)  # fmt: skip

#: Why a request was turned away (the ``reason`` label of rejections).
REJECTION_REASONS = ("queue_full", "class_queue_full", "shed", "rate_limited", "concurrency")

#: Where a deadline passed (the ``stage`` label).
DEADLINE_STAGES = ("queue", "dispatch", "upstream")

#: Label value for requests that never resolved to a configured task.
UNKNOWN_TASK = "_unknown"


class Metrics:
    """Every metric the gateway exports, registered in ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        tasks: Iterable[tuple[str, str]],
        classes: Iterable[str],
        upstreams: Iterable[str],
    ) -> None:
        self.registry = registry
        task_label = ("task", "priority_class")
        self.requests = Counter(
            "gateway_requests_total", "Requests answered, by task, class and outcome.",
            [*task_label, "outcome"], registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds", "Time spent waiting in the gateway's queue.",
            task_label, buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the first streamed token (streams only).",
            task_label, buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Arrival at the gateway to the last byte sent.",
            task_label, buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "gateway_queue_depth", "Requests waiting in the gateway, by class.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.inflight = Gauge(
            "gateway_inflight_requests", "Requests dispatched to an upstream and not finished.",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.rejections = Counter(
            "gateway_rejections_total", "Requests turned away before reaching an upstream.",
            ["priority_class", "reason"], registry=registry,
        )  # fmt: skip
        self.deadline_exceeded = Counter(
            "gateway_deadline_exceeded_total", "Requests whose deadline passed, by stage.",
            ["task", "stage"], registry=registry,
        )  # fmt: skip
        self.upstream_up = Gauge(
            "gateway_upstream_up", "1 if the upstream is usable, else 0.",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.boosts = Counter(
            "gateway_priority_boosts_total",
            "Requests dispatched ahead of a waiting, more important request thanks to aging.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.degraded = Counter(
            "gateway_degraded_total", "Requests served with a degraded policy under overload.",
            ["task"], registry=registry,
        )  # fmt: skip
        self.shed = Counter(
            "gateway_shed_total", "Queued requests evicted for a more important arrival.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.preinitialise(tasks, classes, upstreams)

    def preinitialise(
        self, tasks: Iterable[tuple[str, str]], classes: Iterable[str], upstreams: Iterable[str]
    ) -> None:
        """Create the zero series for known label values (again after a reload adds tasks)."""
        classes = tuple(classes)
        for task, _ in tasks:
            for pclass in classes:
                for outcome in OUTCOMES:
                    self.requests.labels(task, pclass, outcome)
                self.queue_wait.labels(task, pclass)
                self.ttft.labels(task, pclass)
                self.duration.labels(task, pclass)
            for stage in DEADLINE_STAGES:
                self.deadline_exceeded.labels(task, stage)
            self.degraded.labels(task)
        for pclass in classes:
            for reason in REJECTION_REASONS:
                self.rejections.labels(pclass, reason)
            self.boosts.labels(pclass)
            self.shed.labels(pclass)
        for upstream in upstreams:
            self.upstream_up.labels(upstream)

    def watch_queue(self, class_name: str, depth: Callable[[], float]) -> None:
        """Read the queue depth at scrape time, so the gauge can never drift from the truth."""
        self.queue_depth.labels(class_name).set_function(depth)

    def watch_inflight(self, upstream: str, inflight: Callable[[], float]) -> None:
        self.inflight.labels(upstream).set_function(inflight)
