"""The scheduler's bookkeeping: each class's waiting tickets, and the completion rate.

Pure data structures with no clock of their own; :mod:`gateway.scheduler` decides with them.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


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
    """The waiting tickets of one class: FIFO per tenant, round robin across tenants.

    One tenant's flood cannot starve another tenant of the same class: each dispatch from
    this class takes the head of the next tenant in turn. With a single tenant (no API keys)
    it is plain arrival order. Each tenant's list is kept in key order.
    """

    def __init__(self) -> None:
        self._by_tenant: dict[str, list[tuple[float, int, T]]] = {}
        self._turns: deque[str] = deque()  # tenants with waiting work, next one first
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[T]:
        return (item[2] for items in self._by_tenant.values() for item in items)

    def push(self, ticket: T) -> None:
        items = self._by_tenant.setdefault(ticket.tenant, [])
        if not items:
            self._turns.append(ticket.tenant)
        bisect.insort(items, (ticket.key, ticket.seq, ticket), key=lambda i: i[:2])
        self._len += 1

    def head(self) -> T | None:
        return self._by_tenant[self._turns[0]][0][2] if self._turns else None

    def oldest_arrival(self) -> float | None:
        """When the longest-waiting ticket arrived (each tenant's list is in arrival order)."""
        return min((items[0][2].arrival for items in self._by_tenant.values()), default=None)

    def newest(self) -> T | None:
        """The newest ticket of the tenant with the most waiting: what to shed first."""
        if not self._turns:
            return None
        heaviest = max(self._turns, key=lambda tenant: len(self._by_tenant[tenant]))
        return self._by_tenant[heaviest][-1][2]

    def take(self, ticket: T) -> None:
        """Remove the head being dispatched; its tenant's next ticket waits for a new turn."""
        self.remove(ticket)
        if self._turns and self._turns[0] == ticket.tenant:
            self._turns.rotate(-1)

    def remove(self, ticket: T) -> None:
        items = self._by_tenant[ticket.tenant]
        index = bisect.bisect_left(items, (ticket.key, ticket.seq), key=lambda i: i[:2])
        assert items[index][2] is ticket, "ticket not in its class queue"
        del items[index]
        self._len -= 1
        if not items:
            del self._by_tenant[ticket.tenant]
            self._turns.remove(ticket.tenant)

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
