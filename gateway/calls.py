"""One upstream call's pieces: the call across its attempts, its first event, its usage.

Shared by :mod:`gateway.serving`; nothing here holds a resource (the lifecycle does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import sse
from gateway.classes import to_vllm_priority
from gateway.errors import BadGateway, GatewayError
from gateway.exchange import Exchange
from gateway.outbound import UpstreamRejected, UpstreamResponse, upstream_error
from gateway.protocol import build_upstream_body
from gateway.resume import Progress, continuation
from gateway.scheduler import Ticket
from gateway.steps import Step


@dataclass(slots=True)
class Call:
    """One step's call across its attempts and, if paused, its segments."""

    step: Step
    ticket: Ticket
    max_tokens: int
    progress: Progress


@dataclass(slots=True)
class Opened:
    """An upstream stream whose first event has arrived."""

    first: bytes
    rest: AsyncIterator[bytes]


class Fault(Exception):
    """An attempt failed through the upstream's fault before anything was generated."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


async def read_first_event(response: UpstreamResponse) -> Opened:
    """Wait for the stream's first event, so that every failure until then is a status."""
    if response.status != 200:
        error = upstream_error(response.status, await response.read())
        if isinstance(error, UpstreamRejected):
            raise error
        raise Fault(error)
    if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
        raise Fault(
            BadGateway(
                "the upstream answered a stream request without a stream",
                code="bad_upstream_response",
            )
        )
    events = response.events()
    try:
        first = await anext(events, b"")
    except GatewayError as exc:
        raise Fault(exc) from exc
    if not first:
        raise Fault(
            BadGateway(
                "the upstream closed the stream without an answer", code="bad_upstream_response"
            )
        )
    return Opened(first, events)


def upstream_body(call: Call, model: str | None) -> bytes:
    """The JSON body of the call's next attempt at an upstream serving ``model``: the whole
    step, or after a pause the rest of it (see gateway.resume)."""
    step, progress = call.step, call.progress
    extra: dict[str, Any] = {}
    if progress.segment:  # resuming: the rest of the answer, after what it has
        step, extra = continuation(step, progress.text)
    body = build_upstream_body(
        step.task,
        step.request,
        max_tokens=max(call.max_tokens - progress.tokens, 1),
        priority=to_vllm_priority(call.ticket.effective_priority),
        model=model,
        extra_system=step.extra_system,
    )
    body.update(extra)
    if call.ticket.preemptible:  # usage in every chunk: how far it got, in tokens, if paused
        body["stream_options"]["continuous_usage_stats"] = True
    return orjson.dumps(body)


def dispatched(ex: Exchange, ticket: Ticket) -> None:
    ex.dispatched_at = ticket.dispatched_at
    ex.upstream = ticket.upstream
    ex.priority = to_vllm_priority(ticket.effective_priority)
    ex.boosted = ticket.boosted


def take_usage(ex: Exchange, answer: dict[str, Any]) -> None:
    usage = answer.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        ex.add_usage(
            prompt if isinstance(prompt, int) else None,
            completion if isinstance(completion, int) else None,
        )


def take_usage_chunk(ex: Exchange, batch: bytes, *, keep: bool) -> bytes:
    """Record the usage chunk's counts; drop it from the batch unless the client asked."""
    kept = []
    for event in sse.events(batch):
        if sse.has_usage_only(event):
            take_usage(ex, sse.parse(event) or {})
            if not keep:
                continue
        kept.append(event)
    return b"".join(kept)
