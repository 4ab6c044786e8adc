"""Overflow upstreams take a request only when the primaries are full and its queue wait
would breach its budget; through the scheduler, which applies the rule before it chooses."""

from __future__ import annotations

from gateway.scheduler import Scheduler, State, Window
from tests.unit.test_scheduler import CLASSES, STD, admit_all, dispatched, ticket


def with_overflow() -> Scheduler:
    return Scheduler(CLASSES, 512, [Window("primary", 1), Window("cold", 1, overflow=True)])


def test_overflow_is_not_used_while_a_primary_has_room() -> None:
    s = with_overflow()
    t = ticket(STD, 0.0, queue_s=10)
    admit_all(s, [t], 0.0)
    assert dispatched(s.dispatch(0.0)) == [t]
    assert t.upstream == "primary"


def test_overflow_is_not_used_when_the_primaries_will_free_a_slot_in_time() -> None:
    s = with_overflow()
    for i in range(10):
        s.completions.record(i / 10)  # 10 completions a second: a slot frees in ~0.1 s
    running, waiting = ticket(STD, 1.0, queue_s=10), ticket(STD, 1.0, queue_s=10)
    admit_all(s, [running, waiting], 1.0)
    assert dispatched(s.dispatch(1.0)) == [running]
    assert running.upstream == "primary"
    assert waiting.state is State.QUEUED


def test_overflow_takes_a_request_whose_predicted_wait_breaches_its_queue_budget() -> None:
    s = with_overflow()
    s.completions.record(0.0)  # one completion in 29 s: the next slot is ~29 s away
    running, waiting = ticket(STD, 29.0, queue_s=10), ticket(STD, 29.0, queue_s=10)
    admit_all(s, [running, waiting], 29.0)
    assert dispatched(s.dispatch(29.0)) == [running, waiting]
    assert (running.upstream, waiting.upstream) == ("primary", "cold")


def test_without_completions_overflow_takes_a_request_past_half_its_queue_budget() -> None:
    s = with_overflow()
    running, waiting = ticket(STD, 0.0, queue_s=10), ticket(STD, 0.0, queue_s=10)
    admit_all(s, [running, waiting], 0.0)
    assert dispatched(s.dispatch(0.0)) == [running]
    assert dispatched(s.dispatch(4.9)) == []  # 4.9 s waited, 4.9 s predicted: within 10 s
    assert dispatched(s.dispatch(5.1)) == [waiting]
    assert waiting.upstream == "cold"
