"""The scheduling core: who waits, who goes next, to which upstream, and who is turned away.

Pure logic with an explicit clock (every method takes ``now``), so it is tested without
sleeps or sockets. The asyncio glue that wakes waiting requests lives in
:mod:`gateway.dispatch`.

Model, in one paragraph: every admitted request gets a *key* = arrival time minus its class's
head start; the smallest key goes first (so a request's effective priority is its head start
plus the time it has waited, and aging needs no timers). Each upstream has a *window* of
in-flight slots; a class must leave its *reserve* of the window free for more important
classes, except a request that has aged to the top priority, which may use any slot (this
is what makes the wait bound hold under realtime saturation). Queues are bounded per class
and overall; when the overall bound is hit, a more important arrival evicts (sheds) the
newest request of the least important class below it. A request whose queue deadline
passes, or whose remaining budget falls below what it needs, expires without ever being
sent upstream. Who gives way to whom (shedding, late requests moved back, running requests
paused) is :mod:`gateway.preemption`; a paused request whose answer had begun ages afresh.

Within a class, tenants share by tokens (:mod:`gateway.fairness`): the class competes with
the others by its oldest ticket, exactly as if it were one queue, and the slot it wins goes
to its tenant with the least service over weight. Service is charged here at dispatch (the
prompt) and by :meth:`Scheduler.charge` while the answer streams.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from functools import partial

from gateway.classes import ClassPolicy, ClassTable, effective_priority
from gateway.fairness import FairnessPolicy, Ledger
from gateway.overflow import overdue, spill_to_overflow
from gateway.preemption import demote_late, shed_candidate, victim
from gateway.queues import ClassQueue, CompletionRate
from gateway.routing import Router
from gateway.tickets import (
    Admitted,
    Dispatch,
    Expiry,
    Preempt,
    Rejected,
    State,
    Ticket,
    Window,
)
from gateway.timers import Deadlines


class Scheduler:
    """The gateway's queue and dispatch windows. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        classes: ClassTable,
        max_queued: int,
        windows: Iterable[Window],
        fairness: FairnessPolicy | None = None,
        weights: Mapping[str, float] | None = None,
        router: Router | None = None,
    ) -> None:
        """``fairness``: how tenants of a class share (default: by tokens); ``weights``:
        each tenant's shares (from the keys file; 1 when not named); ``router``: which of
        the windows with room a ticket takes (default: task affinity, gateway.routing).
        ``windows`` may change (gateway.membership); empty until an upstreams file's entries
        are added."""
        self.classes, self.max_queued = classes, max_queued
        self.windows: dict[str, Window] = {w.name: w for w in windows}
        self.fairness = fairness or FairnessPolicy()
        self.weights: Mapping[str, float] = weights or {}
        self.router = router or Router()
        self._queues: dict[str, ClassQueue[Ticket]] = {
            p.name: ClassQueue() for p in classes.ordered
        }
        self._deadlines = Deadlines()
        self._seq = itertools.count()
        self._queued = 0
        self.completions = CompletionRate()
        self._running: dict[Ticket, None] = {}  # dispatched, in dispatch order
        self._preempting = 0
        # When each class last had work left waiting after a dispatch round.
        self._waited_at: dict[str, float] = {}

    # -- configuration ---------------------------------------------------------------

    def reconfigure(
        self,
        classes: ClassTable,
        max_queued: int,
        fairness: FairnessPolicy | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """Take new class policies. Queued tickets keep the policy they were admitted with;
        tenants keep their counters (a new mode or weight applies to service from now on)."""
        self.classes, self.max_queued = classes, max_queued
        if fairness is not None:
            self.fairness = fairness
        if weights is not None:
            self.weights = weights

    # -- observation -----------------------------------------------------------------

    def depth(self, class_name: str) -> int:
        return len(self._queues[class_name])

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def timer_entries(self) -> int:
        """Entries in the expiry heap: at most twice the queued tickets."""
        return len(self._deadlines)

    def running(self) -> Iterable[Ticket]:
        """The dispatched tickets, oldest dispatch first."""
        return self._running.keys()

    def waiting(self) -> Iterator[Ticket]:
        return itertools.chain.from_iterable(self._queues.values())

    def oldest_wait(self, class_name: str, now: float) -> float:
        """Seconds the class's longest-waiting request has waited (paused: since arrival)."""
        oldest = self._queues[class_name].oldest_arrival()
        return 0.0 if oldest is None else max(now - oldest, 0.0)

    def saturation(self) -> float:
        """In flight + queued over the usable primary windows' sizes (>= 1): over 1, work
        waits; summed over gateways, the pool's demand over capacity (deploy/README.md)."""
        capacity = sum(w.size for w in self.windows.values() if w.usable and not w.overflow)
        inflight = sum(w.inflight for w in self.windows.values())
        return (inflight + self._queued) / max(capacity, 1)

    def predicted_wait(self, policy: ClassPolicy, now: float) -> float:
        """Seconds a request of this class arriving now would probably wait (0 if it fits,
        or if it can take a slot back from less important work)."""
        if any(w.has_room(policy.reserved_slots(w.size)) for w in self.windows.values()):
            return 0.0
        rate = self.completions.per_second(now)
        if rate is None:
            return 0.0  # nothing has completed yet: no evidence of overload
        key = now - policy.head_start_s
        ahead = sum(q.count_before(key) for q in self._queues.values())
        pausable = sum(
            1
            for t in self._running
            if t.reclaimable and t.policy.rank > policy.rank and t.key > key
        )
        if ahead < pausable:
            return 0.0
        return (ahead - pausable + 1) / rate

    def retry_after(self, policy: ClassPolicy, now: float) -> int:
        """Whole seconds until a request of this class would likely be admitted again."""
        rate = self.completions.per_second(now)
        if rate is None:
            return 1
        backlog = sum(q.count_before(now - policy.head_start_s) for q in self._queues.values())
        return min(max(math.ceil((backlog + 1) / rate), 1), 60)

    # -- admission -------------------------------------------------------------------

    def admit(self, ticket: Ticket, now: float) -> Admitted | Rejected:
        """Queue the ticket, or say why not.

        Besides the queue bounds, a class that has fallen behind yields: when its oldest
        waiting request has waited more than ``max_wait_s`` while more important work also
        had to wait, new requests of the class are refused. Admitted ones would only be
        served by aging past that more important work, so under sustained overload the
        gateway would drift to first come, first served; refusing at the door keeps the
        classes apart, and what is already queued is still served by aging.
        """
        policy = ticket.policy
        queue = self._queues[policy.name]
        behind = self._behind(policy, queue, now)
        if behind is not None:
            return Rejected(
                "class_overloaded",
                f"the {policy.name} class is overloaded: its oldest request has waited "
                f"{behind:.0f} s behind more important work (limit {policy.max_wait_s:g} s)",
                self.retry_after(policy, now),
            )
        if len(queue) >= policy.max_queued:
            return Rejected(
                "class_queue_full",
                f"the {policy.name} queue is full ({policy.max_queued} waiting)",
                self.retry_after(policy, now),
            )
        shed: tuple[Ticket, ...] = ()
        if self._queued >= self.max_queued:
            evicted = shed_candidate(policy, self.classes.ordered, self._queues)
            if evicted is None:
                return Rejected(
                    "queue_full",
                    f"the gateway queue is full ({self.max_queued} waiting)",
                    self.retry_after(policy, now),
                )
            self._remove(evicted, State.SHED)
            self._deadlines.left()
            shed = (evicted,)
        ticket.seq = next(self._seq)
        ticket.state = State.QUEUED
        # A ticket failing over ran a moment ago: its tenant was active all along.
        queue.push(ticket, returning=ticket.dispatched_at is not None)
        self._queued += 1
        self._deadlines.push(ticket)
        return Admitted(shed)

    def _behind(self, policy: ClassPolicy, queue: ClassQueue[Ticket], now: float) -> float | None:
        """How long the class's oldest request has waited, if past its limit while more
        important work also waited; else None."""
        oldest = queue.oldest_arrival()
        if oldest is None or now - oldest <= policy.max_wait_s:
            return None
        # A paused request waits again, but the class was served: only requests that never
        # ran say it is behind (else every preemption of an old batch request would close
        # the class's door); nor do late ones, which wait behind the class's fresh work.
        # Scanned only past the cheap check.
        oldest = min((t.arrival for t in queue if t.preemptions == 0 and not t.late), default=None)
        if oldest is None or now - oldest <= policy.max_wait_s:
            return None
        since = now - policy.max_wait_s
        above = self.classes.ordered[: policy.rank]
        if any(
            self._queues[p.name] or self._waited_at.get(p.name, -math.inf) >= since for p in above
        ):
            return now - oldest
        return None

    def withdraw(self, ticket: Ticket) -> None:
        """The client gave up while queued: forget the ticket."""
        if ticket.state is State.QUEUED:
            self._remove(ticket, State.WITHDRAWN)
            self._deadlines.left()

    def requeue(self, ticket: Ticket, now: float) -> None:
        """Queue a preempted ticket again, past admission (it was admitted once). One paused
        before its answer began keeps its old place (its aged priority): its wait goes on.
        One whose answer began ages afresh from the pause, as if it arrived now: its wait
        ended, and keeping its aged priority would let it take the slot straight back from
        the fresh, more important request it was paused for (each pause then costs it at
        most its class's gap to the top, and ``max_preemptions`` bounds the pauses). Its
        queue deadline no longer applies; its total deadline still does."""
        if ticket.started:
            ticket.penalty_s = max(now - ticket.arrival, 0.0)
            ticket.late_at = math.inf  # its first token came: the time-to-first-token is met
        ticket.seq = next(self._seq)
        ticket.state = State.QUEUED
        ticket.queue_deadline = ticket.deadline
        self._queues[ticket.policy.name].push(ticket, returning=True)
        self._queued += 1
        self._deadlines.push(ticket)

    def _remove(self, ticket: Ticket, state: State) -> None:
        self._queues[ticket.policy.name].remove(ticket)
        self._queued -= 1
        ticket.state = state

    # -- time ------------------------------------------------------------------------

    def expire(self, now: float) -> list[Expiry]:
        """Remove and return queued tickets whose time ran out."""
        expired = self._deadlines.due(now)
        for ticket in expired:
            self._remove(ticket, State.EXPIRED)
        return [Expiry(ticket, ticket.expiry_stage) for ticket in expired]

    def next_expiry(self) -> float | None:
        """When :meth:`expire` next has something to do, if ever."""
        return self._deadlines.next()

    # -- dispatch --------------------------------------------------------------------

    def dispatch(self, now: float) -> list[Dispatch | Expiry | Preempt]:
        """Release every ticket that fits into a window now, best key first.

        Also returns tickets found expired on the way, so the caller can answer them, and, when
        the best waiting ticket fits nowhere, a running ticket to pause for it (one at a time:
        the next is chosen once that one's slot is free).
        """
        released: list[Dispatch | Expiry | Preempt] = list(self.expire(now))
        while (picked := self._pick(now)) is not None:
            ticket, window = picked
            self._queues[ticket.policy.name].take(ticket)
            self._queued -= 1
            ticket.state = State.DISPATCHED
            self._deadlines.left()
            if ticket.dispatched_at is None:  # its first time: the prompt is read once
                self.charge(ticket, max(ticket.prompt_tokens, 1), 0.0, now, requests=1)
            self._reserve(ticket)
            ticket.upstream, ticket.dispatched_at = window.name, now
            ticket.effective_priority = effective_priority(ticket.policy, now - ticket.arrival)
            # Aging mattered iff a more important request is still waiting: with headroom
            # non-decreasing by rank, that request would have fit wherever this one did.
            ticket.boosted = any(
                len(self._queues[p.name]) > 0 for p in self.classes.ordered[: ticket.policy.rank]
            )
            window.inflight += 1
            self._running[ticket] = None
            released.append(Dispatch(ticket))
        fronts = (t for q in self._queues.values() if (t := q.front()) is not None)
        if self._preempting == 0 and (pause := victim(fronts, self._running, self.windows)):
            pause.preempting = True
            pause.preemptions += 1
            self._preempting += 1
            released.append(Preempt(pause))
        for name, queue in self._queues.items():
            if queue:
                self._waited_at[name] = now
                queue.ledger.waiting(queue.tenants(), now)
        return released

    def _pick(self, now: float) -> tuple[Ticket, Window] | None:
        for queue in self._queues.values():
            if queue:  # on every dispatch: the empty ones cost nothing
                demote_late(queue, now, self.classes.top_head_start_s)
        fronts = [(t, q) for q in self._queues.values() if (t := q.front()) is not None]
        for front, queue in sorted(fronts, key=lambda f: (f[0].key, f[0].seq)):
            ticket = queue.head()
            assert ticket is not None
            window = self._window_for(ticket, now, front.key)
            if window is not None:
                return ticket, window
        return None

    # -- fairness between tenants ------------------------------------------------------

    def charge(
        self, ticket: Ticket, prompt: float, output: float, now: float, *, requests: int = 0
    ) -> None:
        """Charge tokens the ticket's request used to its tenant, in its class, as they are
        used (generated tokens while they stream, the prompt's exact count at the end)."""
        weight = self.weights.get(ticket.tenant, 1.0)
        ledger = self._queues[ticket.policy.name].ledger
        ledger.charge(ticket.tenant, self.fairness, prompt, output, requests, weight, now)
        if ticket.reserved and output:  # what was reserved for these tokens is now service
            used = min(ticket.reserved, output * self.fairness.output_weight / weight)
            ticket.reserved -= used
            ledger.unreserve(ticket.tenant, used)

    def _reserve(self, ticket: Ticket) -> None:
        """Hold what the ticket may still generate against its tenant while it runs."""
        if self.fairness.mode == "tokens" and ticket.output_tokens and ticket.tenant:
            weight = self.weights.get(ticket.tenant, 1.0)
            ticket.reserved = ticket.output_tokens * self.fairness.output_weight / weight
            self._queues[ticket.policy.name].ledger.reserve(ticket.tenant, ticket.reserved)

    def ledgers(self) -> dict[str, Ledger]:
        """Each class's tenant counters and recent service (for metrics and the status page)."""
        return {name: queue.ledger for name, queue in self._queues.items()}

    def keep(self, ticket: Ticket) -> None:
        """A preemption could not be carried out (nothing to pause): the ticket runs on."""
        if ticket.preempting:
            ticket.preempting = False
            ticket.preemptions -= 1
            self._preempting -= 1

    def _window_for(self, ticket: Ticket, now: float, key: float) -> Window | None:
        # A class aged to the top priority (``key``: its oldest ticket's) ignores headroom:
        # otherwise a steady stream of realtime work would keep the window too full for it,
        # and it would starve. So does a ticket whose slot can be taken back (work
        # conserving: a reserve is a right to preempt, not idle capacity).
        promoted = now - key >= self.classes.top_head_start_s or ticket.reclaimable
        windows: Iterable[Window] = self.windows.values()
        if ticket.avoid:
            others = [w for w in windows if w.usable and w.name not in ticket.avoid]
            windows = others or windows
        late = partial(overdue, ticket, now, self.completions, self._queues.values())
        windows = spill_to_overflow(ticket, windows, promoted, late)
        reserve = ticket.policy.reserved_slots
        fits = [w for w in windows if w.has_room(0 if promoted else reserve(w.size))]
        return self.router.choose(ticket.task, fits, tuple(self.windows))

    def release(self, ticket: Ticket, now: float) -> None:
        """A dispatched ticket finished (any outcome): free its slot."""
        if ticket.state is not State.DISPATCHED or ticket.upstream is None:
            return
        ticket.state = State.DONE
        self._running.pop(ticket, None)
        queue = self._queues[ticket.policy.name]
        queue.ledger.unreserve(ticket.tenant, ticket.reserved)  # it generates no more here
        ticket.reserved = 0.0
        queue.done(ticket)
        paused = ticket.preempting
        if paused:
            ticket.preempting = False
            self._preempting -= 1
        window = self.windows.get(ticket.upstream)
        if window is not None:
            window.freed()
        if not paused:  # a pause is not a completion: it would inflate the drain rate
            self.completions.record(now)


__all__ = [
    "Admitted", "ClassQueue", "CompletionRate", "Dispatch", "Expiry", "Preempt", "Rejected",
    "Scheduler", "State", "Ticket", "Window",
]  # fmt: skip
