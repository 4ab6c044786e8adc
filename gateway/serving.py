"""Serving one task step: queue it, count its input, send it to vLLM, relay or collect.

    dispatch ─▶ count the input ─▶ POST (always a stream) ─▶ first event ─┬▶ Stream (relay)
     (queue)     (on the upstream     with failover                     └▶ Answer (collected)
                  it was sent to)

:meth:`Serving.run` returns a result (:class:`Answer` or :class:`Stream`, each with its
headers) and never releases anything itself: every resource it acquires (the ticket, the
upstream response, the stream's deadline timer) is handed to the request's
:class:`~gateway.lifecycle.Lifecycle` the moment it exists, and the lifecycle releases it.

Deadlines: the queue deadline is the scheduler's; after dispatch, the request's total
deadline bounds counting, connecting and the first event, then closes the upstream
connection of a stream still running (vLLM aborts the request and frees its KV cache).
Before the first byte reaches the client that is a 504; once a stream has started it is an
in-band error event followed by ``[DONE]``.

Failover: any failure before the first event (refused, reset, timed out, a 5xx, not a
stream, a failed token count) is the upstream's: its breaker hears of it and the request
goes back through the scheduler to a usable upstream it has not tried (arrival and deadlines
kept), at most once per upstream. Nothing was generated then (vLLM always streams to us).
After the first event a failure ends the answer (in band, or 502/504 when collected).

Preemption: a pausable step (see :mod:`gateway.resume`) registers its lifecycle's pause with
the dispatcher; when the scheduler takes its slot back, the call is cut, queued again (see
:meth:`gateway.scheduler.Scheduler.requeue` for where) and resumed from what it had generated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from gateway import sse
from gateway.admission import degrade, refuse_if_late
from gateway.calls import (
    Call,
    Fault,
    Opened,
    dispatched,
    read_first_event,
    take_usage,
    take_usage_chunk,
    upstream_body,
)
from gateway.chunks import Assembler, collect
from gateway.config import Task
from gateway.dispatch import Dispatcher
from gateway.errors import (
    BadGateway,
    BadRequest,
    DeadlineExceeded,
    GatewayError,
    ServiceUnavailable,
)
from gateway.estimates import Estimates
from gateway.exchange import Exchange, outcome_for
from gateway.fairness import Meter, estimate_prompt_tokens
from gateway.input_limit import fit_input
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics
from gateway.outbound import UpstreamClient, UpstreamRejected
from gateway.resume import Progress, resumable
from gateway.scheduler import Ticket
from gateway.sizing import Sizing, pace_for
from gateway.steps import Answer, Step, Stream
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway.serving")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class Serving:
    """Runs task steps. Built once in the lifespan with the parts it uses."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        upstreams: Upstreams,
        client: UpstreamClient,
        metrics: Metrics,
        sizing: Sizing,
    ) -> None:
        self._dispatcher = dispatcher
        self._upstreams = upstreams
        self._client = client
        self._metrics = metrics
        self._sizing = sizing
        self.seen = Estimates()

    def now(self) -> float:
        return self._dispatcher.now()

    async def run(
        self, life: Lifecycle, step: Step, *, first_event: Callable[[bytes], bytes] | None = None
    ) -> Answer | Stream:
        """Run the step for the request ``life`` owns, up to its result."""
        headers: dict[str, str] = {}
        scheduler, now = self._dispatcher.scheduler, self.now()
        max_tokens = degrade(scheduler, self._metrics, life.exchange, step, headers, now)
        refuse_if_late(scheduler, self.seen, self._metrics, life.exchange, step, max_tokens, now)
        # A two-step task's reply (first_event) is not paused: its first chunk is rewritten.
        ticket = await self._dispatch(life, step, max_tokens, pausable=first_event is None)
        call = Call(step, ticket, max_tokens, Progress(step.request.endpoint == "chat"))
        life.meter = self._meter(life.exchange, ticket)
        try:
            async with asyncio.timeout_at(ticket.deadline):
                opened = await self._open(life, call, headers)
                if not step.request.stream:
                    return Answer(await self._collect(life, call, opened), headers)
        except TimeoutError:
            raise self._upstream_deadline(step.task) from None
        life.arm_deadline(ticket.deadline)
        return Stream(self._relay(life, call, opened, first_event), headers)

    async def _dispatch(
        self, life: Lifecycle, step: Step, max_tokens: int, *, pausable: bool
    ) -> Ticket:
        """Queue the step and wait for its turn; the ticket names the upstream it got."""
        if not self._upstreams.any_up():
            raise ServiceUnavailable(
                "no upstream is ready; retry shortly",
                code="no_upstream",
                headers={"Retry-After": "2"},
            )
        ex = life.exchange
        ex.queued_at = step.queued_at if step.queued_at is not None else ex.arrival
        ticket = Ticket(
            task=step.task.name,
            policy=step.policy,
            arrival=ex.queued_at,  # aging counts time in the queue
            queue_deadline=ex.arrival + min(step.budget.queue_s, step.budget.total_s),
            deadline=ex.arrival + step.budget.total_s,  # deadlines count from the arrival
            late_at=ex.arrival + step.task.sla_ttft_s,  # waiting past it, it cannot make it
            refuse_late=step.request.stream and not step.task.serve_late,  # see Ticket
            need_s=self.seen.ttft.get(step.task.name),
            pace_s=pace_for(step.task, max_tokens),
            tenant=step.tenant,
        )
        if step.tenant:  # API keys: tenants share each class by tokens (gateway.fairness)
            text = step.request.input_text()
            ticket.prompt_tokens = max(estimate_prompt_tokens(text, step.task.system_prompt), 1)
            ticket.output_tokens = max_tokens
        life.ticket = ticket
        if pausable and resumable(step):
            ticket.preemptible = True
            self._dispatcher.on_preempt(ticket, life.pause)
        await self._dispatcher.acquire(ticket)
        dispatched(ex, ticket)
        return ticket

    def _meter(self, ex: Exchange, ticket: Ticket) -> Meter | None:
        """What charges the step's tokens to its tenant as they stream; none without keys
        (one tenant: nothing to share, and the relay stays as it was)."""
        if not ticket.tenant:
            return None
        charge, now = self._dispatcher.scheduler.charge, self._dispatcher.now
        before = (ex.prompt_tokens or 0, ex.completion_tokens or 0)
        return Meter(lambda p, o: charge(ticket, p, o, now()), ticket.prompt_tokens, before)

    # -- opening, with failover --------------------------------------------------------

    async def _open(
        self, life: Lifecycle, call: Call, headers: dict[str, str], *, counted: bool = False
    ) -> Opened:
        """Count the input and start the call at the ticket's upstream, failing over while
        upstreams fail (``call.step`` becomes the step as sent: its input perhaps truncated),
        and queueing it again if it is paused before its first event."""
        ticket = call.ticket
        tries = 0
        while True:
            tries += 1
            upstream = ticket.upstream
            assert upstream is not None
            try:
                if not counted:
                    call.step = await self._fit(call.step, upstream, headers)
                    counted = True
                opened = await self._attempt(life, call)
            except Fault as fault:
                if life.paused:  # not the upstream's fault: the slot was taken back
                    await self._requeue(life, call)
                    tries -= 1
                    continue
                self._upstreams.failed(upstream, fault.error.message)
                if tries >= len(self._upstreams.by_name) or not await self._redispatch(
                    life.exchange, ticket, fault.error
                ):
                    raise fault.error from None
                continue
            except UpstreamRejected:
                self._upstreams.succeeded(upstream)  # the upstream works; the request was bad
                raise
            self._upstreams.succeeded(upstream)
            ex = life.exchange
            if call.progress.segment == 0:
                ticket.started = True  # a pause from now on costs it a fresh wait, not its place
                ex.first_byte_at = self._dispatcher.now()
                ttft = ex.first_byte_at - (ex.dispatched_at or ex.arrival)
                self.seen.ttft.observe(call.step.task.name, ttft)
                self._sizing.first_token(upstream, call.step.task.name, ttft)
            return opened

    async def _requeue(self, life: Lifecycle, call: Call) -> None:
        """The scheduler took the call's slot back: give it up, and wait for a new one (at its
        old place if its answer had not begun, else aging afresh: see Scheduler.requeue)."""
        life.paused = False
        life.finish_response(clean=False, keep_timer=True)
        if life.meter is not None:  # what it generated is charged before it waits again
            life.meter.flush()
        ticket = call.ticket
        self._dispatcher.release(ticket)
        self._dispatcher.on_preempt(ticket, life.pause)  # again, while it has pauses left
        life.exchange.preemptions += 1
        await self._dispatcher.requeue(ticket)
        dispatched(life.exchange, ticket)

    async def _resume(
        self, life: Lifecycle, call: Call, collected: Assembler | None = None
    ) -> Opened:
        """Continue a paused call where it stopped, once it has a slot again (``collected``:
        the assembler of a collected answer, which read its chunks)."""
        await self._requeue(life, call)
        call.progress.resumed(collected)
        tokens = call.progress.tokens
        self._metrics.resumed_tokens.labels(call.ticket.policy.name).inc(tokens)
        life.exchange.resumed_tokens += tokens
        try:
            async with asyncio.timeout_at(call.ticket.deadline):
                return await self._open(life, call, {}, counted=True)
        except TimeoutError:
            raise self._upstream_deadline(call.step.task) from None

    async def _fit(self, step: Step, upstream: str, headers: dict[str, str]) -> Step:
        """The step with its input within the task's budget, counted by ``upstream``."""
        base_url = self._upstreams[upstream].base_url
        try:
            request, trimmed = await fit_input(self._client, base_url, step.task, step.request)
        except BadRequest:
            raise
        except GatewayError as exc:
            raise Fault(exc) from exc
        if trimmed is None:
            return step
        headers["X-Input-Truncated"] = f"tokens={trimmed.original_tokens}->{trimmed.kept_tokens}"
        return replace(step, request=request)

    async def _attempt(self, life: Lifecycle, call: Call) -> Opened:
        assert call.ticket.upstream is not None
        upstream = self._upstreams[call.ticket.upstream]
        raw = upstream_body(call, upstream.model)
        headers = {"Content-Type": "application/json", "X-Request-Id": life.exchange.request_id}
        url = upstream.base_url + PATHS[call.step.request.endpoint]
        try:
            response = await self._client.post(url, raw, headers)
        except GatewayError as exc:
            raise Fault(exc) from exc
        life.response = response
        if life.paused:  # paused while connecting
            life.response.abort()
        try:
            return await read_first_event(response)
        except BaseException:
            life.finish_response(clean=False)
            raise

    async def _redispatch(self, ex: Exchange, ticket: Ticket, error: GatewayError) -> bool:
        """Queue the ticket again for a usable upstream it has not tried; False if none.

        It keeps its arrival (its aged place in the queue) and its deadlines; a ticket whose
        queue deadline has passed is not sent again, and the client gets the upstream's error.
        """
        failed = ticket.upstream
        assert failed is not None
        avoid = ticket.avoid | {failed}
        others = [n for n, u in self._upstreams.by_name.items() if u.usable and n not in avoid]
        if not others or ticket.expires_at <= self._dispatcher.now():
            return False
        self._dispatcher.release(ticket)
        ticket.avoid = avoid
        log.warning(
            "request %s: upstream %s failed before the first byte (%s); trying %s",
            ex.request_id,
            failed,
            error.message,
            " or ".join(others),
        )
        await self._dispatcher.acquire(ticket)
        dispatched(ex, ticket)
        return True

    # -- after the first event -----------------------------------------------------------

    async def _collect(self, life: Lifecycle, call: Call, opened: Opened) -> dict[str, Any]:
        """The whole answer of a non-streaming request, put together from its stream (and
        from each segment's, if it was paused)."""
        assembler = Assembler(chat=call.step.request.endpoint == "chat")
        while True:
            try:
                meter = life.meter
                on_batch = None if meter is None else meter.batch
                answer = await collect(opened.first, opened.rest, assembler, on_batch)
                break
            except GatewayError as exc:
                if life.paused:
                    opened = await self._resume(life, call, assembler)
                    continue
                assert life.exchange.upstream is not None
                self._upstreams.failed(life.exchange.upstream, exc.message)
                raise
        life.finish_response(clean=True)
        if isinstance(answer.get("usage"), dict):
            answer["usage"] = call.progress.usage(answer["usage"])
        take_usage(life.exchange, answer)
        self._finished(life, call)
        return answer

    def _finished(self, life: Lifecycle, call: Call) -> None:
        ex = life.exchange
        if life.meter is not None:
            life.meter.settle(ex.prompt_tokens, ex.completion_tokens)
        if call.progress.segment == 0 and ex.first_byte_at is not None and ex.completion_tokens:
            decode_s = self.now() - ex.first_byte_at
            self.seen.finished(call.step.task.name, decode_s, ex.completion_tokens)

    async def _relay(
        self,
        life: Lifecycle,
        call: Call,
        opened: Opened,
        first_event: Callable[[bytes], bytes] | None,
    ) -> AsyncIterator[bytes]:
        """Yield the upstream's events as they come, in the batches they came in; ``[DONE]``
        last. A paused call resumes seamlessly (see gateway.resume).

        It releases nothing: the request's lifecycle does, whether or not this ever ran.
        """
        ex, meter = life.exchange, life.meter
        progress = call.progress if call.ticket.preemptible else None
        batch = opened.first
        if first_event is not None:
            first, rest = sse.first_and_rest(batch)
            batch = first_event(first) + rest
        while True:
            done = sse.is_done(batch)
            if meter is not None:
                meter.batch(batch)
            if progress is not None:
                batch = progress.read(batch)
            if sse.has_usage_only(batch):
                batch = take_usage_chunk(ex, batch, keep=call.step.request.include_usage)
            if done:
                life.finish_response(clean=True)
                self._finished(life, call)
            if batch:
                yield batch
            if done:
                return
            error: GatewayError | None = None
            try:
                batch = await anext(opened.rest, b"")
            except GatewayError as exc:
                error, batch = exc, b""
            if not batch and life.paused and progress is not None:
                try:
                    opened = await self._resume(life, call)
                except GatewayError as exc:
                    error = exc
                else:
                    batch = opened.first
                    continue
            if batch:
                continue
            yield self._stream_error(life, call, error)
            return

    def _stream_error(self, life: Lifecycle, call: Call, error: GatewayError | None) -> bytes:
        """How a stream that broke after its first event ends: an in-band error, [DONE]."""
        ex = life.exchange
        if ex.deadline_hit:
            error = self._upstream_deadline(call.step.task)
        else:
            if error is None:
                error = BadGateway(
                    "the upstream ended the stream early", code="bad_upstream_response"
                )
            if ex.upstream is not None and not isinstance(error, DeadlineExceeded):
                self._upstreams.failed(ex.upstream, error.message)
        ex.fail(error.status, outcome_for(error), error.code)
        return sse.error_event(error) + sse.DONE

    def _upstream_deadline(self, task: Task) -> DeadlineExceeded:
        self._metrics.deadline_exceeded.labels(task.name, "upstream").inc()
        return DeadlineExceeded(
            "the request's deadline passed while the upstream was generating; it was cancelled",
            stage="upstream",
        )
