"""One request's record: its timings and outcome, and what is derived from them.

The same record feeds the ``Server-Timing`` header, the Prometheus metrics and the JSON
access-log line, so the three can never disagree about a request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.metrics import SERVED_OUTCOMES, UNKNOWN_TASK, Metrics

access_logger = logging.getLogger("gateway.access")


@dataclass(slots=True)
class Exchange:
    """Times are event-loop seconds; durations are derived, never stored twice."""

    request_id: str
    arrival: float
    task: str = UNKNOWN_TASK
    priority_class: str = "none"
    stream: bool = False
    queued_at: float | None = None
    dispatched_at: float | None = None
    upstream: str | None = None
    priority: int | None = None
    first_byte_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    outcome: str = "ok"
    status: int = 200
    error_code: str | None = None
    degraded: bool = False
    boosted: bool = False
    label: str | None = None
    deadline_hit: bool = False  # the deadline closed the upstream call
    preemptions: int = 0  # times the request was paused for more important work
    resumed_tokens: int = 0  # tokens kept across those pauses

    @property
    def queue_s(self) -> float | None:
        if self.dispatched_at is None:
            return None
        return self.dispatched_at - (self.arrival if self.queued_at is None else self.queued_at)

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token, for streams (what the client experiences)."""
        if not self.stream or self.first_byte_at is None:
            return None
        return self.first_byte_at - self.arrival

    @property
    def upstream_s(self) -> float | None:
        """Dispatch to the upstream's first byte (the whole answer for non-streams)."""
        if self.dispatched_at is None or self.first_byte_at is None:
            return None
        return self.first_byte_at - self.dispatched_at

    def server_timing(self, now: float) -> str:
        """``Server-Timing`` value in milliseconds. For a stream, ``total`` is time to headers."""
        parts = []
        if self.queue_s is not None:
            parts.append(f"queue;dur={self.queue_s * 1000:.1f}")
        if self.ttft_s is not None:
            parts.append(f"ttft;dur={self.ttft_s * 1000:.1f}")
        elif self.upstream_s is not None:
            parts.append(f"upstream;dur={self.upstream_s * 1000:.1f}")
        parts.append(f"total;dur={(now - self.arrival) * 1000:.1f}")
        return ", ".join(parts)

    def fail(self, status: int, outcome: str, code: str | None) -> None:
        self.status, self.outcome, self.error_code = status, outcome, code

    def add_usage(self, prompt: int | None, completion: int | None) -> None:
        """Add a step's token counts (a two-step task has two)."""
        if prompt is not None:
            self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        if completion is not None:
            self.completion_tokens = (self.completion_tokens or 0) + completion


def outcome_for(error: GatewayError) -> str:
    """The bounded ``outcome`` label for an error answer."""
    status, code = error.status, error.code
    if code == "shed":
        return "shed"
    if code == "shutting_down":
        return "shutdown"
    if status == 429:
        return "rejected"
    if status == 504:
        return "deadline"
    if status >= 500:
        return "upstream_error"
    return "client_error"


def record(exchange: Exchange, metrics: Metrics, now: float, *, log: bool) -> None:
    """The request is over: observe its metrics and write its access-log line."""
    exchange.finished_at = now
    task, pclass = exchange.task, exchange.priority_class
    metrics.requests.labels(task, pclass, exchange.outcome).inc()
    if task != UNKNOWN_TASK and pclass != "none":
        duration, ttft = now - exchange.arrival, exchange.ttft_s
        if exchange.outcome in SERVED_OUTCOMES:
            metrics.duration.labels(task, pclass).observe(duration)
            if ttft is not None:
                metrics.ttft.labels(task, pclass).observe(ttft)
        if exchange.queue_s is not None:
            metrics.queue_wait.labels(task, pclass).observe(exchange.queue_s)
        if metrics.on_request is not None:
            metrics.on_request(task, exchange.outcome, now, duration, ttft, exchange.error_code)
    if log and access_logger.isEnabledFor(logging.INFO):
        access_logger.info("%s", _JsonLine(_log_fields(exchange, now)))


class _JsonLine:
    """An access-log line encoded only when a handler formats it: with the process's
    queue handler (see ``gateway.__main__``), in the writer thread, off the event loop."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return json.dumps(self.fields, ensure_ascii=False)


def _log_fields(e: Exchange, now: float) -> dict[str, object]:
    return {
        "request_id": e.request_id,
        "task": e.task,
        "priority_class": e.priority_class,
        "priority": e.priority,
        "upstream": e.upstream,
        "stream": e.stream,
        "status": e.status,
        "outcome": e.outcome,
        "error": e.error_code,
        "queue_ms": _ms(e.queue_s),
        "ttft_ms": _ms(e.ttft_s),
        "upstream_ms": _ms(e.upstream_s),
        "total_ms": _ms(now - e.arrival),
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "degraded": e.degraded,
        "boosted": e.boosted,
        "preemptions": e.preemptions,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
