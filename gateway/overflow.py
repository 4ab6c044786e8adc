"""When an overflow upstream (cold or extra capacity) may take a request.

Pure logic. The scheduler calls :func:`spill_to_overflow` before it chooses a window, so how
it chooses among the windows left (least loaded, or task affinity) is not this module's
business. The rule: a request may go to an overflow window only when no primary window has
room for it and :func:`overdue` says its queue wait would breach its class's queue budget
(its queue deadline less its arrival).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gateway.queues import ClassQueue, CompletionRate
from gateway.tickets import Ticket, Window


def spill_to_overflow(
    ticket: Ticket, windows: Iterable[Window], promoted: bool, overdue: Callable[[], bool]
) -> Iterable[Window]:
    """The windows the ticket may go to: the primaries, and the overflow windows too when no
    primary has room for it (``promoted``: it may use the class reserve) and ``overdue()``."""
    windows = list(windows)
    primaries = [w for w in windows if not w.overflow]
    if len(primaries) == len(windows):
        return windows  # no overflow upstream: the common case
    room = any(
        w.has_room(0 if promoted else ticket.policy.reserved_slots(w.size)) for w in primaries
    )
    return primaries if room or not overdue() else windows


def overdue(
    ticket: Ticket,
    now: float,
    completions: CompletionRate,
    queues: Iterable[ClassQueue[Ticket]],
) -> bool:
    """Whether the ticket's wait so far plus the predicted rest exceeds its queue budget. The
    rest is the queued tickets up to and including it over the recent completion rate; with
    no completion in the rate's horizon, the wait so far is the prediction of the rest (so
    the ticket spills once half its budget is gone)."""
    waited = now - ticket.arrival
    rate = completions.per_second(now)
    rest = waited if rate is None else sum(q.count_before(ticket.key) for q in queues) / rate
    return waited + rest > ticket.queue_deadline - ticket.arrival
