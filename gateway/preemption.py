"""Who gives way, and to whom: the scheduler's three ways of putting work behind more
important work. Pure functions over its queues (:mod:`gateway.scheduler` calls them with
``now``).

- **Shed**: over the overall queue bound, an arrival evicts the newest request of the least
  important class below it (from that class's tenant furthest above its share).
- **Late**: a queued request that can no longer make its time to first token moves behind
  every request that still can. Serving it first would spend the slot on an answer already
  late and make the fresh ones behind it late too: under overload, first come first served
  misses every deadline. It is still served if a slot frees before its queue deadline.
- **Pause**: when the best waiting request fits nowhere, a running request of a less
  important class is paused (preempted) for it, and later resumed where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from gateway.classes import ClassPolicy
from gateway.queues import ClassQueue
from gateway.tickets import Ticket, Window


def shed_candidate(
    arriving: ClassPolicy, ordered: Sequence[ClassPolicy], queues: Mapping[str, ClassQueue[Ticket]]
) -> Ticket | None:
    """The newest request of the least important class below the arriving one, from the
    tenant of that class furthest above its share."""
    for policy in reversed(ordered):
        if policy.rank <= arriving.rank:
            return None
        newest = queues[policy.name].newest()
        if newest is not None:
            return newest
    return None


def demote_late(queue: ClassQueue[Ticket], now: float, penalty_s: float) -> None:
    """Move the class's leading tickets that are late behind every ticket that is not (their
    key moves back by ``penalty_s``, the top head start). Only the tickets that decide the
    next dispatch are checked; the others are when they come to the front."""
    while True:  # on every dispatch: no allocation while nothing is late
        ticket = queue.front()
        if ticket is None or ticket.late_at > now:
            ticket = queue.head()  # the same ticket unless tenants share the class
            if ticket is None or ticket.late_at > now:
                return

        def demote(ticket: Ticket = ticket) -> None:
            ticket.late, ticket.late_at = True, math.inf
            ticket.penalty_s += penalty_s

        queue.rekey(ticket, demote)


def victim(
    fronts: Iterable[Ticket], running: Iterable[Ticket], windows: Mapping[str, Window]
) -> Ticket | None:
    """The running ticket to pause for the best waiting one (the smallest key of the
    classes' ``fronts``), if that one is not late: of a less important class, reclaimable, on
    a usable upstream, and either behind it in the queue's order even after aging, or
    answering and never paused before. So a request that aged past fresh work is paused at
    most once for it, after its answer began (the aging bound is a bound on the wait for an
    answer to begin), and then ages afresh: it finishes within about twice its class's aging
    bound plus its own service, instead of being paused again each time it comes back (an
    integration test saw a background request starve that way). The least important class
    first, and within it the most recently started (the least work to set aside)."""
    waiting = min(fronts, key=lambda t: (t.key, t.seq), default=None)
    if waiting is None or waiting.late:  # a late answer takes a free slot, not a running one's
        return None
    candidates = [
        t
        for t in running
        if t.reclaimable
        and not t.preempting
        and t.policy.rank > waiting.policy.rank
        and (t.key > waiting.key or (t.started and t.preemptions == 0))
        and t.upstream is not None
        and windows[t.upstream].usable
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t.policy.rank, t.dispatched_at or 0.0))
