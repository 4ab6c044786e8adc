"""Serving one task step: queue it, send it to vLLM, relay the answer.

    admit ─▶ queue (dispatcher) ─▶ POST to the upstream ─▶ JSON answer
                                                       └▶ SSE relay, event by event

Deadlines: the queue deadline is the scheduler's; after dispatch, the request's total
deadline closes the upstream connection (vLLM then aborts the request and frees its KV
cache). Before the first byte reaches the client that is a 504; once a stream has started it
is an in-band error event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.responses import Response, StreamingResponse

from gateway import sse
from gateway.classes import ClassPolicy, to_vllm_priority
from gateway.config import Task
from gateway.errors import (
    BadGateway,
    BadRequest,
    DeadlineExceeded,
    GatewayError,
    ServiceUnavailable,
)
from gateway.exchange import Exchange, outcome_for_status, record
from gateway.input_limit import fit_input
from gateway.protocol import ClientRequest, build_upstream_body, granted_max_tokens
from gateway.runtime import Runtime
from gateway.scheduler import Ticket
from gateway.upstream import UpstreamResponse

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class Budget:
    """Seconds from arrival: until dispatch at the latest, and until the last byte."""

    queue_s: float
    total_s: float

    @classmethod
    def for_task(cls, task: Task, header: str | None) -> Budget:
        """The task's deadlines, tightened (never loosened) by ``X-Request-Deadline-Ms``."""
        if header is None:
            return cls(task.queue_deadline_s, task.deadline_s)
        try:
            # A budget beyond the task's deadline changes nothing; clamping keeps absurdly long
            # numbers from overflowing the float division below.
            ms = min(int(header), 10**12)
        except ValueError:
            ms = 0
        if ms <= 0:
            raise BadRequest(
                "X-Request-Deadline-Ms must be a positive integer (milliseconds from arrival)",
                param="X-Request-Deadline-Ms",
                code="invalid_value",
            )
        return cls(min(task.queue_deadline_s, ms / 1000), min(task.deadline_s, ms / 1000))


class UpstreamRejected(GatewayError):
    """vLLM refused the request as invalid (e.g. too long for the context): the client's 4xx."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(message, code=code or "upstream_rejected")
        self.status = status


@dataclass(slots=True)
class Step:
    """One upstream call for a task: what to send and how to treat the answer."""

    task: Task
    policy: ClassPolicy
    request: ClientRequest
    budget: Budget
    extra_system: str | None = None
    queued_at: float | None = None  # when this step joined the queue, if not at arrival
    tenant: str = ""  # for fairness between tenants inside a class


def degrade(rt: Runtime, ex: Exchange, step: Step) -> int:
    """The max_tokens to grant, capped by the task's degrade policy when the queue is long."""
    granted = granted_max_tokens(step.task, step.request)
    policy = step.task.degrade
    if policy is None or granted <= policy.max_tokens:
        return granted
    if rt.scheduler.predicted_wait(step.policy, rt.dispatcher.now()) <= policy.when_wait_s:
        return granted
    ex.degraded = True
    rt.metrics.degraded.labels(step.task.name).inc()
    return policy.max_tokens


async def fit(rt: Runtime, step: Step, headers: dict[str, str]) -> Step:
    """The step with its input within the task's budget (truncated or refused)."""
    upstream = next((u for u in rt.upstreams.by_name.values() if u.up), None)
    if upstream is None:
        raise ServiceUnavailable("no upstream is ready; retry shortly", code="no_upstream")
    request, trimmed = await fit_input(rt.client, upstream.base_url, step.task, step.request)
    if trimmed is None:
        return step
    headers["X-Input-Truncated"] = f"tokens={trimmed.original_tokens}->{trimmed.kept_tokens}"
    return replace(step, request=request)


async def dispatch(rt: Runtime, ex: Exchange, step: Step) -> Ticket:
    """Queue the step and wait for its turn; the ticket names the upstream it got."""
    if not rt.upstreams.any_up():
        raise ServiceUnavailable("no upstream is ready; retry shortly", code="no_upstream")
    ex.queued_at = step.queued_at if step.queued_at is not None else ex.arrival
    ticket = Ticket(
        task=step.task.name,
        policy=step.policy,
        arrival=ex.queued_at,  # aging counts time in the queue
        queue_deadline=ex.arrival + min(step.budget.queue_s, step.budget.total_s),
        deadline=ex.arrival + step.budget.total_s,  # deadlines count from the client's arrival
        need_s=rt.ttft.get(step.task.name),
        tenant=step.tenant,
    )
    await rt.dispatcher.acquire(ticket)
    ex.dispatched_at = ticket.dispatched_at
    ex.upstream = ticket.upstream
    ex.priority = to_vllm_priority(ticket.effective_priority)
    ex.boosted = ticket.boosted
    return ticket


def upstream_body(rt: Runtime, ex: Exchange, step: Step, ticket: Ticket, max_tokens: int) -> bytes:
    assert ticket.upstream is not None
    assert ex.priority is not None
    body = build_upstream_body(
        step.task,
        step.request,
        max_tokens=max_tokens,
        priority=ex.priority,
        model=rt.upstreams[ticket.upstream].model,
        extra_system=step.extra_system,
    )
    return json.dumps(body, ensure_ascii=False).encode()


async def call_json(
    rt: Runtime, ex: Exchange, step: Step, ticket: Ticket, body: bytes
) -> tuple[bytes, dict[str, Any]]:
    """A non-streaming call: the whole answer, raw and parsed, within the deadline."""
    url = _url(rt, ticket, step)
    try:
        async with asyncio.timeout_at(ticket.deadline):
            response = await _post(rt, ticket, url, body, ex, stream=False)
            raw = await response.read()
    except TimeoutError:
        raise _upstream_deadline(rt, step.task) from None
    ex.first_byte_at = rt.dispatcher.now()
    if response.status != 200:
        raise upstream_error(response.status, raw)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise BadGateway(
            "the upstream answered with invalid JSON", code="bad_upstream_response"
        ) from None
    if not isinstance(answer, dict):
        raise BadGateway("the upstream answered with a non-object", code="bad_upstream_response")
    _take_usage(ex, answer)
    rt.ttft.observe(step.task.name, ex.first_byte_at - (ex.dispatched_at or ex.arrival))
    return raw, answer


@dataclass(slots=True)
class OpenStream:
    response: UpstreamResponse
    first: bytes
    rest: AsyncIterator[bytes]


async def open_stream(
    rt: Runtime, ex: Exchange, step: Step, ticket: Ticket, body: bytes
) -> OpenStream:
    """Start a streaming call and wait for its first event, so errors can still be statuses."""
    url = _url(rt, ticket, step)
    response: UpstreamResponse | None = None
    try:
        async with asyncio.timeout_at(ticket.deadline):
            response = await _post(rt, ticket, url, body, ex, stream=True)
            if response.status != 200:
                raise upstream_error(response.status, await response.read())
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                raise BadGateway(
                    "the upstream answered a stream request without a stream",
                    code="bad_upstream_response",
                )
            events = response.events()
            first = await anext(events, b"")
    except TimeoutError:
        if response is not None:
            response.abort()
        raise _upstream_deadline(rt, step.task) from None
    except BaseException:
        if response is not None:
            response.abort()
        raise
    if not first:
        response.abort()
        raise BadGateway(
            "the upstream closed the stream without an answer", code="bad_upstream_response"
        )
    ex.first_byte_at = rt.dispatcher.now()
    rt.ttft.observe(step.task.name, ex.first_byte_at - (ex.dispatched_at or ex.arrival))
    return OpenStream(response, first, events)


async def relay(
    rt: Runtime,
    ex: Exchange,
    step: Step,
    ticket: Ticket,
    stream: OpenStream,
    first_event: Callable[[bytes], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the upstream's events to the client as they come, nothing buffered.

    Ends with ``[DONE]`` in every case. A deadline closes the upstream connection from a timer
    (one per request, not one per event) and turns into an in-band error event.
    """
    loop = asyncio.get_running_loop()
    deadline_hit = False

    def on_deadline() -> None:
        nonlocal deadline_hit
        deadline_hit = True
        stream.response.abort()

    timer = loop.call_at(ticket.deadline, on_deadline)
    clean = False
    event = first_event(stream.first) if first_event else stream.first
    try:
        while True:
            if sse.is_done(event):
                clean = True
                yield event
                return
            if sse.is_usage_only(event):
                _take_usage(ex, sse.parse(event) or {})
                if step.request.include_usage:
                    yield event
            else:
                yield event
            try:
                event = await anext(stream.rest, b"")
            except GatewayError as exc:
                error = _upstream_deadline(rt, step.task) if deadline_hit else exc
                ex.fail(error.status, outcome_for_status(error.status, error.code), error.code)
                yield sse.error_event(error)
                yield sse.DONE
                return
            if not event:
                error = BadGateway(
                    "the upstream ended the stream early", code="bad_upstream_response"
                )
                ex.fail(error.status, "upstream_error", error.code)
                yield sse.error_event(error)
                yield sse.DONE
                return
    except BaseException:
        ex.fail(499, "cancelled", "client_closed")  # client gone (or server stopping)
        raise
    finally:
        timer.cancel()
        if clean:
            stream.response.release()
        else:
            stream.response.abort()
        rt.dispatcher.release(ticket)
        record(ex, rt.metrics, rt.dispatcher.now(), log=rt.settings.access_log)


def json_response(rt: Runtime, ex: Exchange, content: bytes, headers: dict[str, str]) -> Response:
    now = rt.dispatcher.now()
    headers["Server-Timing"] = ex.server_timing(now)
    return Response(content, media_type="application/json", headers=headers)


def stream_response(
    rt: Runtime, ex: Exchange, events: AsyncIterator[bytes], headers: dict[str, str]
) -> StreamingResponse:
    headers["Server-Timing"] = ex.server_timing(rt.dispatcher.now())
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"  # tell nginx-style proxies in front not to buffer
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def upstream_error(status: int, raw: bytes) -> GatewayError:
    """An upstream's non-200 answer as the client's error: its own 4xx, or ours for 5xx."""
    message, code = f"the upstream answered {status}", None
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    if 400 <= status < 500 and status != 429:
        return UpstreamRejected(status, message, code)
    if status in (429, 503):
        return ServiceUnavailable(f"the upstream is overloaded: {message}", code="upstream_busy")
    return BadGateway(f"the upstream failed: {message}", code="upstream_error")


async def _post(
    rt: Runtime, ticket: Ticket, url: str, body: bytes, ex: Exchange, *, stream: bool
) -> UpstreamResponse:
    headers = {"Content-Type": "application/json", "X-Request-Id": ex.request_id}
    try:
        return await rt.client.post(url, body, headers, stream=stream)
    except ServiceUnavailable as exc:
        # Passive health check: stop dispatching there until the health loop sees it back.
        assert ticket.upstream is not None
        rt.upstreams.mark(rt.upstreams[ticket.upstream], up=False, error=exc.message)
        raise


def _url(rt: Runtime, ticket: Ticket, step: Step) -> str:
    assert ticket.upstream is not None
    return rt.upstreams[ticket.upstream].base_url + PATHS[step.request.endpoint]


def _upstream_deadline(rt: Runtime, task: Task) -> DeadlineExceeded:
    rt.metrics.deadline_exceeded.labels(task.name, "upstream").inc()
    return DeadlineExceeded(
        "the request's deadline passed while the upstream was generating; it was cancelled",
        stage="upstream",
    )


def _take_usage(ex: Exchange, answer: dict[str, Any]) -> None:
    usage = answer.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        ex.prompt_tokens = prompt if isinstance(prompt, int) else None
        ex.completion_tokens = completion if isinstance(completion, int) else None


async def serve(
    rt: Runtime,
    ex: Exchange,
    step: Step,
    headers: dict[str, str],
    *,
    transform_json: Callable[[dict[str, Any]], bytes] | None = None,
    transform_first_event: Callable[[bytes], bytes] | None = None,
) -> Response:
    """Run one step end to end and build the client's response.

    A stream's slot is released by its relay when the stream ends; everything else releases
    it here before returning.
    """
    step = await fit(rt, step, headers)
    max_tokens = degrade(rt, ex, step)
    if ex.degraded:
        headers["X-Degraded"] = f"max_tokens={max_tokens}"
    ticket = await dispatch(rt, ex, step)
    try:
        body = upstream_body(rt, ex, step, ticket, max_tokens)
        if step.request.stream:
            stream = await open_stream(rt, ex, step, ticket, body)
        else:
            raw, answer = await call_json(rt, ex, step, ticket, body)
    except BaseException:
        rt.dispatcher.release(ticket)
        raise
    if step.request.stream:
        events = relay(rt, ex, step, ticket, stream, transform_first_event)
        return stream_response(rt, ex, events, headers)
    rt.dispatcher.release(ticket)
    return json_response(rt, ex, transform_json(answer) if transform_json else raw, headers)
