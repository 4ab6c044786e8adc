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
sent upstream. A request that can no longer make its time to first token (it has waited
past its task's ``sla_ttft_s``) is *late*: it moves behind every request that still can, so
under overload the gateway serves answers that will be on time instead of first come, first
served (which makes every answer late); it is still served if a slot frees before its queue
deadline. A running request of a less important class may be paused (preempted) for the
best waiting one; if its answer had begun, it ages afresh from the pause.

Within a class, tenants share by tokens (:mod:`gateway.fairness`): the class competes with
the others by its oldest ticket, exactly as if it were one queue, and the slot it wins goes
to its tenant with the least service over weight. Service is charged here at dispatch (the
prompt) and by :meth:`Scheduler.charge` while the answer streams.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping

from gateway.classes import ClassPolicy, ClassTable, effective_priority
from gateway.fairness import FairnessPolicy, Ledger
from gateway.queues import ClassQueue, CompletionRate
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


class Scheduler:
    """The gateway's queue and dispatch windows. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        classes: ClassTable,
        max_queued: int,
        windows: Iterable[Window],
        fairness: FairnessPolicy | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        """``fairness``: how tenants of a class share (default: by tokens); ``weights``:
        each tenant's shares (from the keys file; 1 when not named)."""
        self.classes = classes
        self.max_queued = max_queued
        self.windows: dict[str, Window] = {w.name: w for w in windows}
        if not self.windows:
            raise ValueError("a scheduler needs at least one upstream window")
        self.fairness = fairness or FairnessPolicy()
        self.weights: Mapping[str, float] = weights or {}
        self._queues: dict[str, ClassQueue[Ticket]] = {
            p.name: ClassQueue() for p in classes.ordered
        }
        # Queue deadlines, soonest first. A ticket that leaves the queue otherwise (dispatched,
        # withdrawn, shed) leaves a stale entry; the heap is rebuilt once stale entries are the
        # majority, so it never holds more than twice what is queued (not rate x deadline).
        self._expiries: list[tuple[float, int, Ticket]] = []
        self._stale = 0
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
        return len(self._expiries)

    def running(self) -> Iterable[Ticket]:
        """The dispatched tickets, oldest dispatch first."""
        return self._running.keys()

    def waiting(self) -> Iterator[Ticket]:
        for queue in self._queues.values():
            yield from queue

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
            victim = self._shed_candidate(policy)
            if victim is None:
                return Rejected(
                    "queue_full",
                    f"the gateway queue is full ({self.max_queued} waiting)",
                    self.retry_after(policy, now),
                )
            self._remove(victim, State.SHED)
            self._left_queue()
            shed = (victim,)
        ticket.seq = next(self._seq)
        ticket.state = State.QUEUED
        # A ticket failing over ran a moment ago: its tenant was active all along.
        queue.push(ticket, returning=ticket.dispatched_at is not None)
        self._queued += 1
        heapq.heappush(self._expiries, (ticket.expires_at, ticket.seq, ticket))
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

    def _shed_candidate(self, arriving: ClassPolicy) -> Ticket | None:
        """The newest request of the least important class below the arriving one, from the
        tenant of that class furthest above its share."""
        for policy in reversed(self.classes.ordered):
            if policy.rank <= arriving.rank:
                return None
            newest = self._queues[policy.name].newest()
            if newest is not None:
                return newest
        return None

    def withdraw(self, ticket: Ticket) -> None:
        """The client gave up while queued: forget the ticket."""
        if ticket.state is State.QUEUED:
            self._remove(ticket, State.WITHDRAWN)
            self._left_queue()

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
        heapq.heappush(self._expiries, (ticket.expires_at, ticket.seq, ticket))

    def _remove(self, ticket: Ticket, state: State) -> None:
        self._queues[ticket.policy.name].remove(ticket)
        self._queued -= 1
        ticket.state = state

    def _left_queue(self) -> None:
        """A queued ticket left other than by expiring: its heap entry is now stale."""
        self._stale += 1
        if self._stale * 2 > len(self._expiries):
            self._expiries = [e for e in self._expiries if _live(e)]
            heapq.heapify(self._expiries)
            self._stale = 0

    # -- time ------------------------------------------------------------------------

    def expire(self, now: float) -> list[Expiry]:
        """Remove and return queued tickets whose time ran out."""
        expired = []
        while self._expiries and self._expiries[0][0] <= now:
            entry = heapq.heappop(self._expiries)
            ticket = entry[2]
            if _live(entry):
                self._remove(ticket, State.EXPIRED)
                expired.append(Expiry(ticket, ticket.expiry_stage))
            else:
                self._stale -= 1
        return expired

    def next_expiry(self) -> float | None:
        """When :meth:`expire` next has something to do, if ever."""
        while self._expiries and not _live(self._expiries[0]):
            heapq.heappop(self._expiries)
            self._stale -= 1
        return self._expiries[0][0] if self._expiries else None

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
            self._left_queue()
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
        if self._preempting == 0 and (victim := self._victim(now)) is not None:
            victim.preempting = True
            victim.preemptions += 1
            self._preempting += 1
            released.append(Preempt(victim))
        for name, queue in self._queues.items():
            if queue:
                self._waited_at[name] = now
                queue.ledger.waiting(queue.tenants(), now)
        return released

    def _pick(self, now: float) -> tuple[Ticket, Window] | None:
        for queue in self._queues.values():
            self._demote_late(queue, now)
        fronts = [(t, q) for q in self._queues.values() if (t := q.front()) is not None]
        for front, queue in sorted(fronts, key=lambda f: (f[0].key, f[0].seq)):
            ticket = queue.head()
            assert ticket is not None
            window = self._window_for(ticket, now, front.key)
            if window is not None:
                return ticket, window
        return None

    def _demote_late(self, queue: ClassQueue[Ticket], now: float) -> None:
        """Move the class's leading tickets that can no longer make their time to first
        token behind every ticket that still can: serving them first would spend the slot
        on an answer already late and make the fresh ones behind them late too (under
        overload, first come first served misses every deadline). They are still served
        when a slot is free before their queue deadline. Only the tickets that decide the
        next dispatch are checked; the others are when they come to the front."""
        while True:
            late = [t for t in (queue.front(), queue.head()) if t is not None and t.late_at <= now]
            if not late:
                return
            ticket = late[0]

            def demote(ticket: Ticket = ticket) -> None:
                ticket.late, ticket.late_at = True, math.inf
                ticket.penalty_s += self.classes.top_head_start_s

            queue.rekey(ticket, demote)

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

    def _victim(self, now: float) -> Ticket | None:
        """The running ticket to pause for the best waiting one, if that one fits nowhere
        and is not late: of a less important class, reclaimable, on a usable upstream, and
        either behind it in the queue's order even after aging or already answering (so the
        aging bound, a bound on the wait for the answer to begin, holds); the least
        important class first, and within it the most recently started (the least work to
        set aside)."""
        fronts = [t for q in self._queues.values() if (t := q.front()) is not None]
        if not fronts:
            return None
        waiting = min(fronts, key=lambda t: (t.key, t.seq))
        if waiting.late:  # an answer already late takes a free slot, never a running one's
            return None
        candidates = [
            t
            for t in self._running
            if t.reclaimable
            and not t.preempting
            and t.policy.rank > waiting.policy.rank
            and (t.key > waiting.key or t.started)
            and t.upstream is not None
            and self.windows[t.upstream].usable
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda t: (t.policy.rank, t.dispatched_at or 0.0))

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
        best: Window | None = None
        for window in windows:
            reserved = 0 if promoted else ticket.policy.reserved_slots(window.size)
            if window.has_room(reserved) and (
                best is None or window.occupied / window.size < best.occupied / best.size
            ):
                best = window
        return best

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
            window.inflight -= 1
        if not paused:  # a pause is not a completion: it would inflate the drain rate
            self.completions.record(now)


def _live(entry: tuple[float, int, Ticket]) -> bool:
    """The heap entry is its ticket's current one (a failover re-queues with a new seq)."""
    return entry[2].state is State.QUEUED and entry[1] == entry[2].seq


__all__ = [
    "Admitted",
    "ClassQueue",
    "CompletionRate",
    "Dispatch",
    "Expiry",
    "Preempt",
    "Rejected",
    "Scheduler",
    "State",
    "Ticket",
    "Window",
]
