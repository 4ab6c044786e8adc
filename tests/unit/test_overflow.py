"""Overflow upstreams take a request only when the primaries are full and its queue wait
would breach its budget; through the scheduler, which applies the rule before it chooses."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from gateway.dispatch import Dispatcher
from gateway.metrics import Metrics
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


async def test_the_dispatcher_sends_an_overdue_request_to_overflow_with_no_other_event() -> None:
    """Nothing is released and nothing arrives: the dispatcher's own poll sees the queued
    request pass half its queue budget (no completions yet) and spills it, well before its
    queue deadline would expire it."""
    scheduler = with_overflow()
    dispatcher = Dispatcher(scheduler, Metrics(CollectorRegistry(), (), (), ()))
    now = dispatcher.now()
    hog = ticket(STD, now, queue_s=60)
    await dispatcher.acquire(hog)  # takes the only primary slot and keeps it
    waiting = ticket(STD, now, queue_s=1.0)
    async with asyncio.timeout(0.9):  # its queue deadline is at 1 s
        await dispatcher.acquire(waiting)
    assert waiting.upstream == "cold"
    assert dispatcher.now() - now >= 0.5  # not before half its budget had gone
