"""The asyncio side of the scheduler: park a request until the scheduler releases it.

The scheduler decides; this module only turns its decisions into woken futures, answers the
requests it expired or shed, and keeps one timer armed for the next queue deadline. Its
clock is the event loop's, so scheduler times and timer times agree.

Whether a queued request may spill to an overflow upstream (:mod:`gateway.overflow`)
depends on how long it has waited, which no event announces: while requests wait and an
overflow window has room, the timer also fires every ``SPILL_POLL_S``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.errors import DeadlineExceeded, GatewayError, RateLimited, ServiceUnavailable
from gateway.metrics import Metrics
from gateway.scheduler import Dispatch, Expiry, Preempt, Rejected, Scheduler, State, Ticket

#: How late, at most, a queued request is seen to have become overdue for an overflow
#: upstream when nothing else happens (a twentieth of the tightest shipped queue budget, 2 s).
SPILL_POLL_S = 0.1


class Dispatcher:
    """Owns the scheduler for one event loop. Build it inside the running loop."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics) -> None:
        self.scheduler = scheduler
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._pausers: dict[Ticket, Callable[[], None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: Told after every dispatch round (the window leases follow demand, gateway.leases).
        self.after_pump: Callable[[], None] | None = None

    def now(self) -> float:
        return self._loop.time()

    async def acquire(self, ticket: Ticket) -> None:
        """Wait until ``ticket`` is dispatched to an upstream (``ticket.upstream``).

        Raises RateLimited when it is not admitted or can no longer make its SLA,
        ServiceUnavailable when it is shed for a more important request, DeadlineExceeded
        when its time runs out in the queue. If the caller is cancelled (client gone) the
        ticket leaves the queue or its slot.
        """
        admission = self.scheduler.admit(ticket, self.now())
        if isinstance(admission, Rejected):
            self._pausers.pop(ticket, None)  # it never runs: nothing to pause
            raise self._refusal(ticket, admission)
        for victim in admission.shed:
            self._shed(victim)
        await self._wait(ticket)

    async def requeue(self, ticket: Ticket) -> None:
        """Wait until a preempted (and released) ticket is dispatched again; no admission."""
        self.scheduler.requeue(ticket, self.now())
        await self._wait(ticket)

    def on_preempt(self, ticket: Ticket, pause: Callable[[], None]) -> None:
        """The next time ``ticket`` is dispatched, ``pause()`` is how the scheduler may take its
        slot back: it must stop the upstream call and, soon after, release the ticket. Set it
        before each acquire or requeue (a release forgets it)."""
        self._pausers[ticket] = pause

    async def _wait(self, ticket: Ticket) -> None:
        waiter = self._loop.create_future()
        self._waiters[ticket] = waiter
        self._pump()
        try:
            await waiter
        except asyncio.CancelledError:
            self._waiters.pop(ticket, None)
            if ticket.state is State.QUEUED:
                self.scheduler.withdraw(ticket)
            elif ticket.state is State.DISPATCHED:  # released and cancelled in the same tick
                self.release(ticket)
            raise
        finally:
            if ticket.state is not State.DISPATCHED:  # expired, shed or withdrawn: it never
                self._pausers.pop(ticket, None)  # runs, and its pauser would keep it alive

    def release(self, ticket: Ticket) -> None:
        """A dispatched request is finished, whatever its outcome: free its slot."""
        if ticket.state is State.DISPATCHED:
            self._pausers.pop(ticket, None)
            self.scheduler.release(ticket, self.now())
            self._pump()

    def kick(self) -> None:
        """Re-run dispatch after something outside changed (a window grew, an upstream came up)."""
        self._pump()

    def _pump(self) -> None:
        for item in self.scheduler.dispatch(self.now()):
            if isinstance(item, Dispatch):
                if item.ticket.boosted:
                    self._metrics.boosts.labels(item.ticket.policy.name).inc()
                self._resolve(item.ticket, None)
            elif isinstance(item, Preempt):
                self._metrics.preemptions.labels(item.ticket.policy.name).inc()
                pause = self._pausers.pop(item.ticket, None)
                if pause is None:
                    self.scheduler.keep(item.ticket)
                else:
                    pause()
            else:
                self._expire(item)
        self._arm_timer()
        if self.after_pump is not None:
            self.after_pump()

    def _expire(self, expiry: Expiry) -> None:
        ticket = expiry.ticket
        if expiry.stage == "sla":  # a refusal the client can retry, not a timeout
            why = "the request could not start within its task's time to first token (sla_ttft_s)"
            retry = self.scheduler.retry_after(ticket.policy, self.now())
            self._resolve(ticket, self._refusal(ticket, Rejected("sla_unreachable", why, retry)))
            return
        self._metrics.deadline_exceeded.labels(ticket.task, expiry.stage).inc()
        if expiry.stage == "queue":
            message = "the request waited in the queue past its deadline"
        else:
            message = "too little of the request's deadline was left to start it upstream"
        self._resolve(ticket, DeadlineExceeded(message, stage=expiry.stage))

    def _refusal(self, ticket: Ticket, rejected: Rejected) -> RateLimited:
        """The 429 for a ticket turned away (at the door, or from the queue), counted."""
        self._metrics.rejections.labels(ticket.policy.name, rejected.reason).inc()
        return RateLimited(
            f"{rejected.message}; retry after {rejected.retry_after_s} s",
            code=rejected.reason,
            retry_after_s=rejected.retry_after_s,
        )

    def _shed(self, ticket: Ticket) -> None:
        self._metrics.shed.labels(ticket.policy.name).inc()
        self._metrics.rejections.labels(ticket.policy.name, "shed").inc()
        retry = self.scheduler.retry_after(ticket.policy, self.now())
        self._resolve(
            ticket,
            ServiceUnavailable(
                "the request was shed from the queue to make room for more important work",
                code="shed",
                headers={"Retry-After": str(retry)},
            ),
        )

    def _resolve(self, ticket: Ticket, error: GatewayError | None) -> None:
        waiter = self._waiters.pop(ticket, None)
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)

    def _arm_timer(self) -> None:
        at = self.scheduler.next_expiry()
        if self.scheduler.queued and any(
            w.overflow and w.has_room(0) for w in self.scheduler.windows.values()
        ):
            soon = self.now() + SPILL_POLL_S
            if self._timer_at is not None and self._timer_at <= soon:
                return  # the armed timer comes soon enough (an early pump is harmless)
            at = soon if at is None else min(at, soon)
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._pump()
