"""A class's queue: FIFO per tenant, the least-served tenant next, its oldest ticket as the
class's place, shedding from the tenant furthest above its share; and the completion rate."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.fairness import FairnessPolicy
from gateway.queues import ClassQueue, CompletionRate

TOKENS = FairnessPolicy()


@dataclass(eq=False)
class Item:
    tenant: str
    arrival: float
    seq: int = 0

    @property
    def key(self) -> float:
        return self.arrival


def queue(*items: Item) -> ClassQueue[Item]:
    q: ClassQueue[Item] = ClassQueue()
    for i, item in enumerate(items):
        item.seq = i
        q.push(item)
    return q


def serve(q: ClassQueue[Item], item: Item, tokens: float) -> None:
    q.take(item)
    q.ledger.charge(item.tenant, TOKENS, tokens, 0.0, 0, 1.0, 0.0)


def test_one_tenant_is_first_come_first_served() -> None:
    a, b = Item("", 2.0), Item("", 1.0)
    q = queue(a, b)
    assert q.head() is b
    q.take(b)
    assert q.head() is a


def test_the_least_served_tenant_goes_next_with_its_oldest_ticket() -> None:
    a1, a2, b1 = Item("a", 1.0), Item("a", 2.0), Item("b", 3.0)
    q = queue(a1, a2, b1)
    serve(q, q.head(), 100)  # type: ignore[arg-type]
    assert q.head() is b1  # a was served 100 tokens, b nothing
    serve(q, b1, 10)
    assert q.head() is a2  # b has nothing left waiting


def test_among_equals_turns_go_round() -> None:
    a1, a2, b1, b2 = Item("a", 1.0), Item("a", 2.0), Item("b", 3.0), Item("b", 4.0)
    q = queue(a1, a2, b1, b2)
    order = []
    while (head := q.head()) is not None:
        order.append(head)
        q.take(head)  # nothing charged: counters stay equal
    assert order == [a1, b1, a2, b2]


def test_the_class_front_is_its_oldest_ticket_whoever_goes_next() -> None:
    old, fresh = Item("a", 1.0), Item("b", 9.0)
    q = queue(old, fresh)
    q.ledger.charge("a", TOKENS, 500, 0.0, 0, 1.0, 0.0)
    assert q.head() is fresh
    assert q.front() is old
    assert q.oldest_arrival() == 1.0


def test_shedding_takes_the_newest_of_the_tenant_furthest_above_its_share() -> None:
    heavy = [Item("heavy", 1.0), Item("heavy", 2.0)]
    light = [Item("light", 3.0 + i) for i in range(4)]
    q = queue(*heavy, *light)
    assert q.newest() is light[-1]  # equal counters: the tenant with most waiting
    q.ledger.charge("heavy", TOKENS, 50, 0.0, 0, 1.0, 0.0)
    assert q.newest() is heavy[-1]


def test_a_tenant_stays_active_while_its_ticket_runs() -> None:
    """Dispatched is still active: its next request is not lifted as a newcomer's."""
    a1, b1 = Item("a", 1.0), Item("b", 2.0)
    q = queue(a1, b1)
    serve(q, a1, 300)
    serve(q, b1, 50)
    q.done(b1)  # b is idle now; a still runs
    b2 = Item("b", 5.0, seq=10)
    q.push(b2)
    assert q.ledger.counter("b") == 300  # lifted to a's, the least active
    a2 = Item("a", 6.0, seq=11)
    q.push(a2)
    assert q.ledger.counter("a") == 300
    q.remove(b2)
    q.remove(a2)
    q.done(a1)
    assert len(q) == 0


def test_count_before_counts_every_tenant() -> None:
    q = queue(Item("a", 1.0), Item("b", 2.0), Item("a", 3.0))
    assert q.count_before(2.5) == 2


def test_completion_rate_over_its_horizon() -> None:
    rate = CompletionRate(horizon_s=10.0)
    assert rate.per_second(0.0) is None
    for t in range(10):
        rate.record(float(t))
    assert rate.per_second(9.0) == 10 / 9
    assert rate.samples(30.0) == 0
