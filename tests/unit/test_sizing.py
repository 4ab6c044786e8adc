"""The windows' sizing: targets from the task table, evidence in, sizes out (injected clock)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest

from gateway.config import load_config
from gateway.sizing import Sizing, pace_for, ttft_budgets
from gateway.tickets import Ticket, Window


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(
    mode: str = "adaptive", max_size: int = 4
) -> tuple[Sizing, Window, Clock, list[int], list[Ticket]]:
    window, clock, kicks, running = Window("a", 1), Clock(), [], []
    sizing = Sizing(
        [window],
        load_config(None),
        max_size=max_size,
        mode=mode,  # type: ignore[arg-type]
        running=lambda: running,
        clock=clock,
        on_grow=lambda: kicks.append(window.size),
    )
    return sizing, window, clock, kicks, running


def running_ticket(task: str, max_tokens: int, upstream: str = "a") -> Ticket:
    config = load_config(None)
    t = config.tasks[task]
    ticket = Ticket(t.name, config.classes[t.priority_class], 0.0, 60.0, 60.0)
    ticket.upstream, ticket.pace_s = upstream, pace_for(t, max_tokens)
    return ticket


def test_budgets_and_paces_come_from_the_task_table() -> None:
    config = load_config(None)
    budgets = ttft_budgets(config)
    assert budgets["sentiment"] == 1.0  # half of its sla_ttft_s (2 s): the rest is queueing
    assert budgets["batch"] == 60.0
    # chat: 30 s, less its first token's 1.5 s, over the tokens after the first
    assert pace_for(config.tasks["chat"], 256) == pytest.approx(28.5 / 255)
    assert pace_for(config.tasks["chat"], 64) == pytest.approx(28.5 / 63)  # short: slower is fine
    assert pace_for(config.tasks["sentiment"], 10) == math.inf  # a label is its first token
    assert pace_for(config.tasks["chat"], 1) == math.inf


def test_a_fixed_window_stays_at_its_size_whatever_is_measured() -> None:
    sizing, window, clock, kicks, _ = build("fixed", max_size=8)
    assert window.size == 8
    assert sizing.controllers == {}
    window.inflight = 8
    for _ in range(20):
        sizing.first_token("a", "sentiment", 30.0)  # far over target: ignored
        clock.now += 1
        sizing.tick()
    assert window.size == 8
    assert kicks == []


def test_an_adaptive_window_starts_at_its_ceiling_backs_off_and_grows_back() -> None:
    sizing, window, clock, kicks, _ = build(max_size=8)
    assert window.size == 8  # what the operator sized vLLM for
    window.inflight = 8
    for _ in range(8):  # labels at 3 s to their first token: three times their budget
        sizing.first_token("a", "sentiment", 3.0)
        clock.now += 0.5
        sizing.tick()
    assert window.size < 8
    for _ in range(80):  # then 0.2 s, on a full window: it probes back up to the ceiling
        window.inflight = window.size
        sizing.first_token("a", "sentiment", 0.2)
        clock.now += 0.5
        sizing.tick()
    assert window.size == 8
    assert kicks[-1:] == [8]  # every growth woke the dispatcher


def test_each_first_token_is_judged_by_its_own_tasks_budget() -> None:
    """4 s to the first token is fine for a document (budget 5 s), not for a label (1 s)."""
    sizing, window, clock, *_ = build()
    window.inflight = 4
    for _ in range(10):
        sizing.first_token("a", "summarize", 4.0)
        clock.now += 0.5
        sizing.tick()
    assert window.size >= 4
    grown = window.size
    for _ in range(20):  # a first token counts once its request was sent at the current size
        sizing.first_token("a", "sentiment", 4.0)
        clock.now += 0.5
        sizing.tick()
    assert window.size < min(grown, 4)


@pytest.mark.parametrize(("per_token_s", "shrinks"), [(0.3, True), (0.05, False)])
def test_decode_speed_read_from_vllms_histogram_sizes_the_window(
    per_token_s: float, shrinks: bool
) -> None:
    sizing, window, clock, _, running = build()
    running.append(running_ticket("chat", 256))  # a chat in the batch: 0.112 s per token
    window.inflight = 4
    seconds = tokens = 0.0
    readings = []
    for _ in range(12):
        sizing.decoded("a", clock.now, seconds, tokens)
        seconds += 4 * per_token_s * 2  # four streams, two tokens each per reading
        tokens += 4 * 2
        clock.now += 0.6
        sizing.tick()
        readings.append(sizing.snapshots()["a"].tpot_s)
    assert (window.size < 4) is shrinks
    assert pytest.approx(per_token_s) in readings  # the mean over every stream's tokens


def test_slow_decoding_shrinks_nothing_when_nobody_in_flight_needs_the_pace() -> None:
    """Batch answers have minutes: a window full of them may decode slowly. A short chat
    (64 tokens) may too, at up to 0.45 s per token; a long one may not."""
    for tickets, shrinks in [
        ([running_ticket("batch", 512)], False),
        ([running_ticket("batch", 512), running_ticket("chat", 64)], False),
        ([running_ticket("batch", 512), running_ticket("chat", 256)], True),
        ([running_ticket("chat", 256, upstream="elsewhere")], False),
    ]:
        sizing, window, clock, _, running = build()
        running.extend(tickets)
        window.inflight = 4
        for i in range(12):
            sizing.decoded("a", clock.now, 4 * 0.3 * 2 * i, 4 * 2 * i)  # 0.3 s per token
            clock.now += 0.6
            sizing.tick()
        assert (window.size < 4) is shrinks, tickets


def test_a_histogram_that_restarts_or_disappears_is_not_a_sample() -> None:
    sizing, window, clock, *_ = build()
    ctl = sizing.controllers["a"]
    window.inflight = 4
    sizing.decoded("a", clock.now, 100.0, 1000.0)
    clock.now += 1
    sizing.decoded("a", clock.now, 1.0, 10.0)  # vLLM restarted: its counters went down
    clock.now += 1
    sizing.decoded("a", clock.now, None, None)  # not exported (or the scrape went stale)
    clock.now += 1
    sizing.decoded("a", clock.now, 2.0, 20.0)  # a first reading again
    sizing.tick()
    assert ctl.snapshot().tpot_s is None


def test_work_in_flight_and_no_evidence_counts_as_saturated() -> None:
    sizing, window, clock, *_ = build()
    window.inflight = 4
    for _ in range(24):  # twelve seconds of silence with four requests running
        clock.now += 0.5
        sizing.tick()
    assert window.size < 4


def test_an_idle_upstream_holds_its_window() -> None:
    sizing, window, clock, kicks, _ = build()
    for _ in range(120):
        clock.now += 0.5
        sizing.tick()
    assert window.size == 4
    assert kicks == []


def test_a_reload_retargets_the_controllers() -> None:
    sizing, *_ = build()
    config = load_config(None)
    tasks = {**config.tasks, "sentiment": replace(config.tasks["sentiment"], sla_ttft_s=0.5)}
    sizing.reconfigure(replace(config, tasks=tasks))
    assert sizing.controllers["a"].targets.ttft_s == 0.25
    assert sizing.controllers["a"].targets.tpot_s == math.inf  # nothing in flight


async def test_adaptive_sizing_started_without_upstreams_sizes_the_ones_added_later() -> None:
    """An upstreams file's servers are added after the start (gateway.roster): the loop must
    not take "no controllers yet" for "fixed windows"."""
    sizing = Sizing(
        [], load_config(None), max_size=4, mode="adaptive", running=list, clock=Clock(),
        on_grow=lambda: None,
    )  # fmt: skip
    loop = asyncio.create_task(sizing.run())
    await asyncio.sleep(0)  # one step: it returns at once if it thinks it has nothing to do
    assert not loop.done()
    window = Window("late", 1)
    sizing.add(window)
    assert window.size == 4
    assert set(sizing.controllers) == {"late"}
    sizing.remove("late")
    assert sizing.controllers == {}
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
