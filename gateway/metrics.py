"""Prometheus metrics: the names are a contract (see the README's metric table).

One registry per gateway instance, built in the lifespan, never the global default one, so
tests can build as many gateways as they like. Every label value is bounded and known up
front: task and class names from the task table, upstream names from the settings or the
upstreams file (a drained upstream's series are removed: :meth:`Metrics.forget_upstream`), and the
fixed outcome and reason vocabularies below. Series are pre-initialised so dashboards and
alerts see zeros instead of gaps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

#: Latency buckets for LLM work: milliseconds (a label) to minutes (a long batch generation).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip

#: How a request ended (the ``outcome`` label).
OUTCOMES = (
    "ok", "client_error", "rejected", "shed", "deadline", "upstream_error", "cancelled",
    "shutdown", "internal_error",
)  # fmt: skip

#: Outcomes whose latency is observed. Fast refusals (rejected, shed, client_error) and
#: requests the client abandoned (cancelled) would pull the latency percentiles down exactly
#: when the SLA is in danger; they are counted in gateway_requests_total only.
SERVED_OUTCOMES = ("ok", "deadline", "upstream_error")

#: Why a request was turned away (the ``reason`` label of rejections).
REJECTION_REASONS = (
    "queue_full", "class_queue_full", "class_overloaded", "shed", "rate_limited", "concurrency",
    "deadline_unreachable", "sla_unreachable",
)  # fmt: skip

#: Where a deadline passed (the ``stage`` label).
DEADLINE_STAGES = ("queue", "dispatch", "upstream")

#: Label value for requests that never resolved to a configured task.
UNKNOWN_TASK = "_unknown"

#: How a task table reload ended (the ``result`` label of reloads).
RELOAD_RESULTS = ("ok", "refused")

#: Called once per finished request of a known task with
#: ``(task, outcome, now, duration_s, ttft_s, error_code)``; the status page's recent window
#: (:class:`gateway.status.Recent`) listens here. It runs on the hot path: keep it O(1).
RequestHook = Callable[[str, str, float, float, float | None, str | None], None]

#: ``(tenant, priority_class, weighted tokens served since start)`` for every tenant served.
ServiceReader = Callable[[], Iterable[tuple[str, str, float]]]


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
            "gateway_upstream_up",
            "1 if the upstream is usable (answered its health check, circuit closed), else 0.",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.breaker_state = Gauge(
            "gateway_upstream_breaker_state",
            "The upstream's circuit breaker: 0 closed, 1 half-open (probing), 2 open.",
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
        self.preemptions = Counter(
            "gateway_preemptions_total",
            "Requests paused at their upstream for more important work (resumed later).",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.resumed_tokens = Counter(
            "gateway_resumed_tokens_total",
            "Tokens a preempted request kept rather than generating again when resumed.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.shed = Counter(
            "gateway_shed_total", "Queued requests evicted for a more important arrival.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        # Capacity and the upstreams' own view of their load (scraped from vLLM's /metrics).
        self.queue_capacity = Gauge(
            "gateway_queue_capacity", "Requests a class may have waiting (its max_queued).",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.window_size = Gauge(
            "gateway_window_size", "In-flight requests the gateway allows per upstream.",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.upstream_running = Gauge(
            "gateway_upstream_running",
            "Requests the upstream reports running (vLLM's num_requests_running, all clients).",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.upstream_waiting = Gauge(
            "gateway_upstream_waiting",
            "Requests the upstream reports waiting (vLLM's num_requests_waiting, all clients).",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.upstream_kv_cache = Gauge(
            "gateway_upstream_kv_cache_usage_ratio",
            "The upstream's KV cache usage, 0 to 1 (vLLM's kv_cache_usage_perc).",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.fairness_index = Gauge(
            "gateway_fairness_index",
            "Jain's index of the weighted token service of a class's tenants that had work "
            "waiting in the last 60 s: 1 equal shares (by weight), 1/n one tenant got all.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        # Autoscaling signals (deploy/README.md, "Autoscaling vLLM"): vLLM's own waiting
        # count stays near zero because the queue is here, so an autoscaler reads these.
        self.queue_oldest_wait = Gauge(
            "gateway_queue_oldest_wait_seconds",
            "Age of the class's oldest queued request (since its arrival), 0 when none waits.",
            ["priority_class"], registry=registry,
        )  # fmt: skip
        self.saturation = Gauge(
            "gateway_saturation_ratio",
            "(requests in flight + queued) / slots of the usable upstreams' current windows: "
            "above 1 work waits for capacity. Sum it over gateways sharing the upstreams.",
            registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "gateway_task_table_reloads_total", "Task table reloads, by result.",
            ["result"], registry=registry,
        )  # fmt: skip
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        # The upstreams file (gateway.roster): counted like the task table's reloads.
        self.upstream_reloads = Counter(
            "gateway_upstreams_file_reloads_total", "Upstreams file reloads, by result.",
            ["result"], registry=registry,
        )  # fmt: skip
        for result in RELOAD_RESULTS:
            self.upstream_reloads.labels(result)
        self.on_request: RequestHook | None = None
        self.window_lease: Gauge | None = None  # only with Redis (watch_lease)
        self.preinitialise(tasks, classes, upstreams)

    def preinitialise(
        self, tasks: Iterable[tuple[str, str]], classes: Iterable[str], upstreams: Iterable[str]
    ) -> None:
        """Create the zero series for known label values (again after a reload adds tasks)."""
        classes = tuple(classes)
        for task, pclass in tasks:
            # The task's own class only: a lowered class (X-Priority) gets its series on first
            # use, and task x every class would be thousands of mostly empty histograms.
            for outcome in OUTCOMES:
                self.requests.labels(task, pclass, outcome)
            self.queue_wait.labels(task, pclass)
            self.ttft.labels(task, pclass)
            self.duration.labels(task, pclass)
            for stage in DEADLINE_STAGES:
                self.deadline_exceeded.labels(task, stage)
            self.degraded.labels(task)
        for pclass in classes:
            self.queue_capacity.labels(pclass)
            for reason in REJECTION_REASONS:
                self.rejections.labels(pclass, reason)
            self.boosts.labels(pclass)
            self.shed.labels(pclass)
            self.preemptions.labels(pclass)
            self.resumed_tokens.labels(pclass)
        for upstream in upstreams:
            for gauge in (
                self.upstream_up, self.upstream_running, self.upstream_waiting,
                self.upstream_kv_cache, self.window_size, self.breaker_state,
            ):  # fmt: skip
                gauge.labels(upstream)

    def forget_upstream(self, upstream: str) -> None:
        """Remove a drained upstream's series, so dashboards stop showing a server that is
        gone (its counters elsewhere carry no upstream label)."""
        for gauge in (
            self.upstream_up, self.upstream_running, self.upstream_waiting,
            self.upstream_kv_cache, self.window_size, self.breaker_state, self.inflight,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):  # never created: nothing to remove
                gauge.remove(upstream)
        if self.window_lease is not None:
            with contextlib.suppress(KeyError):
                self.window_lease.remove(upstream)

    def set_upstream_load(
        self, upstream: str, running: float, waiting: float, kv_cache_usage: float
    ) -> None:
        self.upstream_running.labels(upstream).set(running)
        self.upstream_waiting.labels(upstream).set(waiting)
        self.upstream_kv_cache.labels(upstream).set(kv_cache_usage)

    def watch_queue(self, class_name: str, depth: Callable[[], float]) -> None:
        """Read the queue depth at scrape time, so the gauge can never drift from the truth."""
        self.queue_depth.labels(class_name).set_function(depth)

    def watch_inflight(self, upstream: str, inflight: Callable[[], float]) -> None:
        self.inflight.labels(upstream).set_function(inflight)

    def watch_capacity(self, class_name: str, max_queued: Callable[[], float]) -> None:
        """Read the class's queue bound at scrape time (a reload may change it)."""
        self.queue_capacity.labels(class_name).set_function(max_queued)

    def watch_window(self, upstream: str, size: Callable[[], float]) -> None:
        self.window_size.labels(upstream).set_function(size)

    def watch_oldest_wait(self, class_name: str, age: Callable[[], float]) -> None:
        """Read the age of the class's oldest queued request at scrape time."""
        self.queue_oldest_wait.labels(class_name).set_function(age)

    def watch_saturation(self, ratio: Callable[[], float]) -> None:
        """Compute the saturation ratio at scrape time: the windows and queues change on
        every dispatch, and a scrape every few seconds is all an autoscaler reads."""
        self.saturation.set_function(ratio)

    def watch_fairness(self, class_name: str, index: Callable[[], float]) -> None:
        """Compute the class's fairness index at scrape time, not on the hot path."""
        self.fairness_index.labels(class_name).set_function(index)

    def watch_service(self, read: ServiceReader) -> None:
        """Export ``gateway_tenant_service_tokens_total{tenant,priority_class}`` from the
        scheduler's own counts at scrape time: charging a tenant costs no metric update.
        Tenants come from the keys file, so the series are bounded."""
        self.registry.register(_ServiceCollector(read))

    def watch_redis(self) -> Gauge:
        """``gateway_redis_up``, exported only when the gateway is given a Redis."""
        return Gauge(
            "gateway_redis_up",
            "1 while the Redis shared with other gateways answers, 0 while this gateway "
            "serves on its own limits and windows.",
            registry=self.registry,
        )

    def watch_lease(self, upstream: str, lease: Callable[[], float]) -> None:
        """Slots of the upstream's window this gateway may fill (Redis; -1 while it is down)."""
        if self.window_lease is None:
            self.window_lease = Gauge(
                "gateway_window_lease",
                "Slots of the upstream's window this gateway may fill, split with the other "
                "gateways through Redis (-1: Redis is down, the whole window is this gateway's).",
                ["upstream"], registry=self.registry,
            )  # fmt: skip
        self.window_lease.labels(upstream).set_function(lease)

    def watch_breaker(self, upstream: str, state: Callable[[], float]) -> None:
        """Read the breaker at scrape time: open turns half-open by the clock, not by an event."""
        self.breaker_state.labels(upstream).set_function(state)


class _ServiceCollector(Collector):
    def __init__(self, read: ServiceReader) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "gateway_tenant_service_tokens",
            "Service a tenant received in a class, in weighted tokens: prompt tokens x "
            "input_weight + generated tokens x output_weight (the [fairness] section).",
            labels=["tenant", "priority_class"],
        )
        for tenant, pclass, tokens in self._read():
            family.add_metric([tenant, pclass], tokens)
        yield family
