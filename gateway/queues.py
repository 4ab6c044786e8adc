"""The scheduler's bookkeeping: each class's waiting tickets, and the completion rate.

Pure data structures with no clock of their own; :mod:`gateway.scheduler` decides with them.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from gateway.fairness import Ledger


class Queued(Protocol):
    """What a queue reads of a waiting request (the scheduler's ``Ticket``)."""

    @property
    def tenant(self) -> str: ...

    @property
    def key(self) -> float: ...

    @property
    def seq(self) -> int: ...

    @property
    def arrival(self) -> float: ...


T = TypeVar("T", bound=Queued)


class ClassQueue(Generic[T]):
    """The waiting tickets of one class: FIFO per tenant, fair shares across tenants.

    The class's next ticket is the oldest of the waiting tenant with the least virtual
    counter (service received over weight, see :mod:`gateway.fairness`), so one tenant's
    flood, or one tenant's long generations, cannot take the class's share from another.
    With a single tenant (no API keys) it is plain arrival order. Each tenant's list is kept
    in key order. The class competes with the other classes by its oldest ticket
    (:meth:`front`): fairness decides only which tenant's ticket takes a slot the class won.
    """

    def __init__(self, ledger: Ledger | None = None) -> None:
        self._by_tenant: dict[str, list[tuple[float, int, T]]] = {}
        # Among tenants with equal counters, turns go round: a tenant goes to the back of
        # the line when it is served or starts waiting (in requests mode, the round robin).
        self._turns: dict[str, int] = {}
        self._turn = itertools.count()
        self._len = 0
        self.ledger = ledger or Ledger()

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        return (item[2] for items in self._by_tenant.values() for item in items)

    def tenants(self) -> Iterable[str]:
        """The tenants with tickets waiting."""
        return self._by_tenant.keys()

    def push(self, ticket: T, *, returning: bool = False) -> None:
        """Queue a ticket. ``returning``: it was running a moment ago (paused, failing over),
        so its tenant's counter is not lifted as a newly active tenant's would be."""
        items = self._by_tenant.setdefault(ticket.tenant, [])
        if not items:
            self._turns[ticket.tenant] = next(self._turn)
        bisect.insort(items, (ticket.key, ticket.seq, ticket), key=lambda i: i[:2])
        self._len += 1
        self.ledger.join(ticket.tenant, returning=returning)

    def head(self) -> T | None:
        """The ticket that gets the class's next slot."""
        if len(self._by_tenant) <= 1:
            return next((items[0][2] for items in self._by_tenant.values()), None)
        counter, turns = self.ledger.counter, self._turns
        tenant = min(self._by_tenant, key=lambda t: (counter(t), turns[t]))
        return self._by_tenant[tenant][0][2]

    def front(self) -> T | None:
        """The class's oldest ticket by key: its place in the order between classes."""
        if len(self._by_tenant) <= 1:  # no keys: one tenant (on every dispatch: keep it cheap)
            return next((items[0][2] for items in self._by_tenant.values()), None)
        heads = (items[0] for items in self._by_tenant.values())
        first = min(heads, key=lambda i: i[:2], default=None)
        return None if first is None else first[2]

    def oldest_arrival(self) -> float | None:
        """When the longest-waiting ticket arrived. Each tenant's list is in key order, which
        is arrival order but for tickets whose key was moved back (late, or paused): then it
        is no later than the oldest arrival among the others."""
        return min((items[0][2].arrival for items in self._by_tenant.values()), default=None)

    def newest(self) -> T | None:
        """What to shed first: the newest ticket of the tenant furthest above its share (the
        highest counter; among equals, the one with the most waiting)."""
        if not self._by_tenant:
            return None
        counter = self.ledger.counter
        heaviest = max(self._by_tenant, key=lambda t: (counter(t), len(self._by_tenant[t])))
        return self._by_tenant[heaviest][-1][2]

    def rekey(self, ticket: T, change: Callable[[], None]) -> None:
        """Move a queued ticket whose key ``change()`` alters to its new place (its tenant
        keeps waiting: no counter moves)."""
        self._unlink(ticket, keep_turn=True)
        change()
        items = self._by_tenant.setdefault(ticket.tenant, [])
        bisect.insort(items, (ticket.key, ticket.seq, ticket), key=lambda i: i[:2])
        self._len += 1

    def take(self, ticket: T) -> None:
        """Remove the head being dispatched; its tenant stays active while it runs."""
        self._unlink(ticket)
        if ticket.tenant in self._turns:
            self._turns[ticket.tenant] = next(self._turn)

    def remove(self, ticket: T) -> None:
        """Remove a ticket that leaves for good (shed, expired, withdrawn)."""
        self._unlink(ticket)
        self.ledger.leave(ticket.tenant)

    def done(self, ticket: T) -> None:
        """A dispatched ticket of this class finished (or was paused, and comes back)."""
        self.ledger.leave(ticket.tenant)

    def _unlink(self, ticket: T, *, keep_turn: bool = False) -> None:
        items = self._by_tenant[ticket.tenant]
        index = bisect.bisect_left(items, (ticket.key, ticket.seq), key=lambda i: i[:2])
        assert items[index][2] is ticket, "ticket not in its class queue"
        del items[index]
        self._len -= 1
        if not items:
            del self._by_tenant[ticket.tenant]
            if not keep_turn:
                del self._turns[ticket.tenant]

    def count_before(self, key: float) -> int:
        """How many queued tickets would go before a new ticket with this key."""
        return sum(
            bisect.bisect_right(items, key, key=lambda i: i[0])
            for items in self._by_tenant.values()
        )


class CompletionRate:
    """Completions per second over a sliding horizon: the basis for Retry-After and waits."""

    def __init__(self, horizon_s: float = 30.0) -> None:
        self._horizon_s = horizon_s
        self._times: deque[float] = deque()
        self._since: float | None = None

    def record(self, now: float) -> None:
        if self._since is None:
            self._since = now
        self._times.append(now)
        self._trim(now)

    def per_second(self, now: float) -> float | None:
        """None until something has completed: no basis for an estimate yet."""
        if self._since is None:
            return None
        self._trim(now)
        span = min(self._horizon_s, max(now - self._since, 1.0))
        return len(self._times) / span if self._times else None

    def samples(self, now: float) -> int:
        """Completions within the horizon: how much evidence the rate rests on."""
        self._trim(now)
        return len(self._times)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self._horizon_s:
            self._times.popleft()
