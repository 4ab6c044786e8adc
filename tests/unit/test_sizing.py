"""The windows' sizing: targets from the task table, evidence in, sizes out (injected clock)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.config import load_config
from gateway.sizing import Sizing, targets_for
from gateway.tickets import Window


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(mode: str = "adaptive", max_size: int = 8) -> tuple[Sizing, Window, Clock, list[int]]:
    window, clock, kicks = Window("a", 1), Clock(), []
    sizing = Sizing(
        [window],
        load_config(None),
        max_size=max_size,
        mode=mode,  # type: ignore[arg-type]
        clock=clock,
        on_grow=lambda: kicks.append(window.size),
    )
    return sizing, window, clock, kicks


def test_targets_come_from_the_tightest_tasks_of_the_shipped_table() -> None:
    targets, budgets = targets_for(load_config(None))
    assert budgets["sentiment"] == 1.0  # half of its sla_ttft_s (2 s): the rest is queueing
    assert budgets["batch"] == 60.0
    assert targets.ttft_s == 1.0
    # chat: (30 s - 3 s) over its 255 tokens after the first; labels (10 tokens) do not count
    assert targets.tpot_s == pytest.approx(27 / 255)


def test_a_fixed_window_stays_at_its_size_whatever_is_measured() -> None:
    sizing, window, clock, kicks = build("fixed")
    assert window.size == 8
    assert sizing.controllers == {}
    window.inflight = 8
    for _ in range(20):
        sizing.first_token("a", "sentiment", 30.0)  # far over target: ignored
        clock.now += 1
        sizing.tick()
    assert window.size == 8
    assert kicks == []


def test_an_adaptive_window_starts_small_and_grows_on_good_latency() -> None:
    sizing, window, clock, kicks = build()
    assert window.size == 4  # the controller's safe start, below the ceiling of 8
    for _ in range(30):
        window.inflight = window.size  # the queue keeps it full
        sizing.first_token("a", "sentiment", 0.2)
        sizing.decoded("a", clock.now, 0.05 * clock.now, clock.now)  # 50 ms per token
        clock.now += 0.5
        sizing.tick()
    assert window.size == 8
    assert kicks[-1:] == [8]  # every growth woke the dispatcher


def test_each_first_token_is_judged_by_its_own_tasks_budget() -> None:
    """4 s to the first token is fine for a document (budget 5 s), not for a label (1 s)."""
    sizing, window, clock, _ = build()
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
    sizing, window, clock, _ = build()
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


def test_a_histogram_that_restarts_or_disappears_is_not_a_sample() -> None:
    sizing, window, clock, _ = build()
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
    sizing, window, clock, _ = build()
    window.inflight = 4
    for _ in range(12):  # six seconds of silence with four requests running
        clock.now += 0.5
        sizing.tick()
    assert window.size < 4


def test_an_idle_upstream_holds_its_window() -> None:
    sizing, window, clock, kicks = build()
    for _ in range(120):
        clock.now += 0.5
        sizing.tick()
    assert window.size == 4
    assert kicks == []


def test_a_reload_retargets_the_controllers() -> None:
    sizing, _, _, _ = build()
    config = load_config(None)
    tasks = {**config.tasks, "sentiment": replace(config.tasks["sentiment"], sla_ttft_s=0.5)}
    sizing.reconfigure(replace(config, tasks=tasks))
    assert sizing.controllers["a"].targets.ttft_s == 0.25
