"""Serving one task step: queue it, send it to vLLM, relay the answer.

    admit ─▶ queue (dispatcher) ─▶ POST to the upstream ─▶ JSON answer
                                                       └▶ SSE relay, event by event

Deadlines: the queue deadline is the scheduler's; after dispatch, the request's total
deadline closes the upstream connection (vLLM then aborts the request and frees its KV
cache). Before the first byte reaches the client that is a 504; once a stream has started it
is an in-band error event followed by ``[DONE]``.

Failover: when the upstream a request was dispatched to fails before anything reached the
client, the request goes back through the scheduler to another usable upstream it has not
tried (its slot freed, its arrival and deadlines kept, so it is not sent after its queue
deadline), with at most as many tries as there are upstreams. What counts as "before
anything reached the client":

    streams      any upstream failure before its first event: connection refused or reset,
                 connect timeout, a 5xx, an answer that is not a stream, silence past the
                 read timeout, a stream closed before its first event. (The first event is
                 read before the client's status line is sent, so nothing has gone out.)
    non-streams  only failures that mean nothing was generated: the connection failed
                 before a response, or the upstream answered 503. A 500 or a broken body
                 may come after a whole generation, so it is the client's 502, not a retry.

Never after the first byte: a stream that breaks later ends with an in-band error. Every
upstream failure, retried or not, is reported to the upstream's circuit breaker
(:mod:`gateway.upstreams`); a client's 4xx and the request's own deadline are not failures.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

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
from gateway.upstream import UpstreamResponse, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("gateway.proxy")

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

T = TypeVar("T")


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
    _dispatched(ex, ticket)
    return ticket


def _dispatched(ex: Exchange, ticket: Ticket) -> None:
    ex.dispatched_at = ticket.dispatched_at
    ex.upstream = ticket.upstream
    ex.priority = to_vllm_priority(ticket.effective_priority)
    ex.boosted = ticket.boosted


def _upstream_body(rt: Runtime, ex: Exchange, step: Step, ticket: Ticket, max_tokens: int) -> bytes:
    """The body for the upstream the ticket is dispatched to: its model id and the aged
    priority depend on where and when it goes, so a failover builds it again."""
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
    rt: Runtime, ex: Exchange, step: Step, ticket: Ticket, max_tokens: int
) -> tuple[bytes, dict[str, Any]]:
    """A non-streaming call: the whole answer, raw and parsed, within the deadline."""
    try:
        async with asyncio.timeout_at(ticket.deadline):
            raw, answer = await _with_failover(rt, ex, step, ticket, max_tokens, _json_attempt)
    except TimeoutError:
        raise _upstream_deadline(rt, step.task) from None
    ex.first_byte_at = rt.dispatcher.now()
    _take_usage(ex, answer)
    rt.ttft.observe(step.task.name, ex.first_byte_at - (ex.dispatched_at or ex.arrival))
    return raw, answer


async def _json_attempt(
    rt: Runtime, ex: Exchange, url: str, body: bytes
) -> tuple[bytes, dict[str, Any]]:
    try:
        response = await _post(rt, url, body, ex, stream=False)
    except (UpstreamUnavailable, UpstreamTimeout) as exc:
        raise _Fault(exc, retry=True) from exc  # no response: nothing was generated
    except BadGateway as exc:
        raise _Fault(exc, retry=False) from exc
    try:
        raw = await response.read()
    except (BadGateway, UpstreamTimeout) as exc:
        raise _Fault(exc, retry=False) from exc
    if response.status != 200:
        error = upstream_error(response.status, raw)
        if not 400 <= response.status < 500:
            raise _Fault(error, retry=response.status == 503)
        raise error
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        bad = BadGateway(
            "the upstream answered with invalid JSON"
            if answer is None
            else "the upstream answered with a non-object",
            code="bad_upstream_response",
        )
        raise _Fault(bad, retry=False)
    return raw, answer


@dataclass(slots=True)
class OpenStream:
    response: UpstreamResponse
    first: bytes
    rest: AsyncIterator[bytes]


async def open_stream(
    rt: Runtime, ex: Exchange, step: Step, ticket: Ticket, max_tokens: int
) -> OpenStream:
    """Start a streaming call and wait for its first event, so errors can still be statuses."""
    try:
        async with asyncio.timeout_at(ticket.deadline):
            stream = await _with_failover(rt, ex, step, ticket, max_tokens, _stream_attempt)
    except TimeoutError:
        raise _upstream_deadline(rt, step.task) from None
    ex.first_byte_at = rt.dispatcher.now()
    rt.ttft.observe(step.task.name, ex.first_byte_at - (ex.dispatched_at or ex.arrival))
    return stream


async def _stream_attempt(rt: Runtime, ex: Exchange, url: str, body: bytes) -> OpenStream:
    try:
        response = await _post(rt, url, body, ex, stream=True)
    except (UpstreamUnavailable, UpstreamTimeout, BadGateway) as exc:
        raise _Fault(exc, retry=True) from exc
    try:
        if response.status != 200:
            error = upstream_error(response.status, await response.read())
            if not 400 <= response.status < 500:
                raise _Fault(error, retry=True)
            raise error
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise _Fault(
                BadGateway(
                    "the upstream answered a stream request without a stream",
                    code="bad_upstream_response",
                ),
                retry=True,
            )
        events = response.events()
        first = await anext(events, b"")
        if not first:
            raise _Fault(
                BadGateway(
                    "the upstream closed the stream without an answer",
                    code="bad_upstream_response",
                ),
                retry=True,
            )
    except (BadGateway, UpstreamTimeout) as exc:  # reading the error body or the first event
        response.abort()
        raise _Fault(exc, retry=True) from exc
    except BaseException:
        response.abort()
        raise
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
    upstream = ticket.upstream
    assert upstream is not None
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
                if deadline_hit:
                    error: GatewayError = _upstream_deadline(rt, step.task)
                else:
                    error = exc
                    rt.upstreams.failed(upstream, exc.message)
                ex.fail(error.status, outcome_for_status(error.status, error.code), error.code)
                yield sse.error_event(error)
                yield sse.DONE
                return
            if not event:
                error = BadGateway(
                    "the upstream ended the stream early", code="bad_upstream_response"
                )
                rt.upstreams.failed(upstream, error.message)
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


class _Fault(Exception):
    """An attempt failed through the upstream's fault; ``retry``: safe to send elsewhere."""

    def __init__(self, error: GatewayError, *, retry: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry = retry


async def _with_failover(
    rt: Runtime,
    ex: Exchange,
    step: Step,
    ticket: Ticket,
    max_tokens: int,
    attempt: Callable[[Runtime, Exchange, str, bytes], Awaitable[T]],
) -> T:
    """Run ``attempt`` at the ticket's upstream, and at others while it fails retryably.

    Each outcome is reported to the upstream's breaker. On return (or raise) the ticket
    holds the slot of the upstream it ended at, which the caller releases as usual.
    """
    tries = 0
    while True:
        tries += 1
        upstream = ticket.upstream
        assert upstream is not None
        try:
            body = _upstream_body(rt, ex, step, ticket, max_tokens)
            result = await attempt(rt, ex, _url(rt, ticket, step), body)
        except _Fault as fault:
            rt.upstreams.failed(upstream, fault.error.message)
            last = not fault.retry or tries >= len(rt.upstreams.by_name)
            if last or not await _redispatch(rt, ex, ticket, fault.error):
                raise fault.error from None
            continue
        except UpstreamRejected:
            rt.upstreams.succeeded(upstream)  # the upstream works; the request was bad
            raise
        rt.upstreams.succeeded(upstream)
        return result


async def _redispatch(rt: Runtime, ex: Exchange, ticket: Ticket, error: GatewayError) -> bool:
    """Queue the ticket again for a usable upstream it has not tried; False if there is none.

    It keeps its arrival (so its aged place in the queue) and its deadlines; a ticket whose
    queue deadline has passed is not sent again, and the client gets the upstream's error.
    """
    failed = ticket.upstream
    assert failed is not None
    avoid = ticket.avoid | {failed}
    others = [u.name for u in rt.upstreams.by_name.values() if u.up and u.name not in avoid]
    if not others or ticket.expires_at <= rt.dispatcher.now():
        return False
    rt.dispatcher.release(ticket)
    ticket.avoid = avoid
    log.warning(
        "request %s: upstream %s failed before the first byte (%s); trying %s",
        ex.request_id,
        failed,
        error.message,
        " or ".join(others),
    )
    await rt.dispatcher.acquire(ticket)
    _dispatched(ex, ticket)
    return True


async def _post(
    rt: Runtime, url: str, body: bytes, ex: Exchange, *, stream: bool
) -> UpstreamResponse:
    headers = {"Content-Type": "application/json", "X-Request-Id": ex.request_id}
    return await rt.client.post(url, body, headers, stream=stream)


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
        if step.request.stream:
            stream = await open_stream(rt, ex, step, ticket, max_tokens)
        else:
            raw, answer = await call_json(rt, ex, step, ticket, max_tokens)
    except BaseException:
        rt.dispatcher.release(ticket)
        raise
    if step.request.stream:
        events = relay(rt, ex, step, ticket, stream, transform_first_event)
        return stream_response(rt, ex, events, headers)
    rt.dispatcher.release(ticket)
    return json_response(rt, ex, transform_json(answer) if transform_json else raw, headers)
