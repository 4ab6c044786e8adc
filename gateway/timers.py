"""Queued tickets' deadlines, soonest first: the scheduler's one timer heap.

Pure bookkeeping with no clock of its own (:mod:`gateway.scheduler` passes ``now``). A ticket
that leaves the queue otherwise than by expiring (dispatched, withdrawn, shed) leaves a stale
entry behind; the heap is rebuilt once stale entries are the majority, so it never holds more
than twice what is queued (not arrival rate x queue deadline: 600 s for batch).
"""

from __future__ import annotations

import heapq

from gateway.tickets import State, Ticket


class Deadlines:
    """When each queued ticket expires. Not thread-safe: one event loop owns it."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Ticket]] = []
        self._stale = 0

    def __len__(self) -> int:
        """Entries held, stale ones included: at most twice the queued tickets."""
        return len(self._heap)

    def push(self, ticket: Ticket) -> None:
        """A ticket was queued (with a fresh ``seq``): time it."""
        heapq.heappush(self._heap, (ticket.expires_at, ticket.seq, ticket))

    def left(self) -> None:
        """A queued ticket left other than by expiring: its entry is now stale."""
        self._stale += 1
        if self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if _live(e)]
            heapq.heapify(self._heap)
            self._stale = 0

    def due(self, now: float) -> list[Ticket]:
        """Pop the queued tickets whose time ran out (the caller takes them off the queue)."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if _live(entry):
                due.append(entry[2])
            else:
                self._stale -= 1
        return due

    def next(self) -> float | None:
        """When :meth:`due` next has something to return, if ever."""
        while self._heap and not _live(self._heap[0]):
            heapq.heappop(self._heap)
            self._stale -= 1
        return self._heap[0][0] if self._heap else None


def _live(entry: tuple[float, int, Ticket]) -> bool:
    """The entry is its ticket's current one (a failover re-queues with a new seq)."""
    return entry[2].state is State.QUEUED and entry[1] == entry[2].seq
