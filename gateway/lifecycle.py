"""One owner per request: everything a request holds is released, and recorded, in one place.

A request acquires, in order: its tenant's concurrency slot (admission), a ticket in the
scheduler (a place in the queue, then a slot in an upstream's window), an open upstream
response, and a deadline timer. :class:`Lifecycle` holds each of them from the moment it is
acquired, and its ``async with`` block releases them all and writes the request's one record
when the block exits, however it exits: an answer, an error, a cancelled task (client gone,
shutdown), or a bug. For a stream the block lives in the ASGI callable that sends the body
(:mod:`gateway.routes`), so it exits even if no chunk was ever produced.

    async with Lifecycle(exchange, clock, release=..., record=...) as life:
        life.hold(grant)              # counted against the tenant until the block exits
        life.ticket = ticket          # released from its window when the block exits
        life.response = response      # aborted (vLLM frees its KV cache) unless finished
        ...

The outcome written is what happened: the error the block raised (its status and code), a
cancellation (``cancelled``, 499) or a shutdown cut (``shutdown``); errors already sent in
band set the outcome on the exchange before the block exits, and an ``ok`` is never left on
a request that did not finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from gateway.errors import GatewayError
from gateway.exchange import Exchange, outcome_for
from gateway.fairness import Meter
from gateway.scheduler import Ticket
from gateway.shared_limits import Grant

log = logging.getLogger("gateway.lifecycle")


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class Closable(Protocol):
    """An upstream response as the lifecycle sees it (see :mod:`gateway.outbound`)."""

    def abort(self) -> None: ...

    def release(self) -> None: ...


class Lifecycle:
    """The owner of one client request's resources. Use it once, as ``async with``."""

    def __init__(
        self,
        exchange: Exchange,
        clock: Callable[[], float],
        *,
        release: Callable[[Ticket], None],
        record: Callable[[Exchange], None],
    ) -> None:
        self.exchange = exchange
        self.ticket: Ticket | None = None
        self.response: Closable | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False  # the scheduler took the slot back; the call is being cut
        self.meter: Meter | None = None  # charges the current step's tokens to the tenant
        self._grant: Grant | None = None
        self._clock = clock
        self._release = release
        self._record = record
        self._closed = False

    def hold(self, grant: Grant) -> None:
        """The request's hold on its tenant's limits (:meth:`SharedLimits.admit`), given
        back when the block exits."""
        self._grant = grant

    def pause(self) -> None:
        """Cut the upstream call so its slot can be taken back (see gateway.resume); the
        serving code sees the cut, releases the ticket and queues it again."""
        self.paused = True
        if self.response is not None:
            self.response.abort()

    def arm_deadline(self, deadline: float) -> None:
        """Close a running stream's upstream connection when its deadline (on the loop's
        clock) passes; the stream then ends with an in-band deadline error."""

        def on_deadline() -> None:
            self.exchange.deadline_hit = True
            if self.response is not None:
                self.response.abort()

        self.timer = asyncio.get_running_loop().call_at(deadline, on_deadline)

    def finish_response(self, *, clean: bool, keep_timer: bool = False) -> None:
        """Done with the upstream response: keep its connection (clean) or drop it."""
        response, self.response = self.response, None
        if self.timer is not None and not keep_timer:
            self.timer.cancel()
            self.timer = None
        if response is None:
            return
        if clean:
            response.release()
        else:
            response.abort()

    def release_ticket(self) -> None:
        """Free the ticket's window slot now (a step ended; the request goes on)."""
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self._release(ticket)

    def failed(self, exc: BaseException) -> None:
        """Say how the request ended, from what ended it (the answer is being sent)."""
        _fail(self.exchange, exc)

    async def __aenter__(self) -> Lifecycle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Release everything and record the request, once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        ex = self.exchange
        if exc is not None:
            _fail(ex, exc)
        try:
            self.finish_response(clean=False)
            if self.meter is not None:  # what streamed before an error or a cancel
                self.meter.flush()
        finally:
            try:
                self.release_ticket()
            finally:
                try:
                    if self._grant is not None:
                        tokens = (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)
                        self._grant.done(self._clock(), tokens)
                finally:
                    self._record(ex)


def _fail(ex: Exchange, exc: BaseException) -> None:
    """Say on the exchange how the request ended, from what ended it."""
    if isinstance(exc, GatewayError):
        ex.fail(exc.status, outcome_for(exc), exc.code)
    elif isinstance(exc, (asyncio.CancelledError, ClientGone)):
        ex.fail(499, "cancelled", "client_closed")
    else:
        ex.fail(500, "internal_error", "internal_error")
