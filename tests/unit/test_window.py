"""The adaptive window on its own: convergence, bounds, under-use, spikes, stale and missing
measurements, on an injected clock.

Convergence is checked against a simulated upstream (:class:`Upstream`) whose latency is flat
up to a knee and grows linearly past it, fed the way the gateway will feed the controller:
a first token per dispatched request, a token batch per stream about every second, a tick
every second, requests waiting whenever the window has room.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.window import (
    Decision,
    WindowController,
    WindowSnapshot,
    WindowTargets,
    WindowTuning,
)


@dataclass(frozen=True)
class Knee:
    """Latency flat up to ``knee`` requests in flight, then growing by a slope per request."""

    knee: int
    ttft_s: float
    ttft_slope_s: float
    tpot_s: float
    tpot_slope_s: float

    def ttft(self, inflight: int) -> float:
        return self.ttft_s + self.ttft_slope_s * max(0, inflight - self.knee)

    def tpot(self, inflight: int) -> float:
        return self.tpot_s + self.tpot_slope_s * max(0, inflight - self.knee)

    def best(self, targets: WindowTargets, max_size: int) -> int:
        """The largest window that meets both targets: where the controller should settle."""
        return max(
            (
                c
                for c in range(1, max_size + 1)
                if self.ttft(c) <= targets.ttft_s and self.tpot(c) <= targets.tpot_s
            ),
            default=0,
        )


#: 2 CPU cores: three sequences at once are fine, a fourth pushes TTFT past 1.2 s.
CPU = Knee(3, ttft_s=0.6, ttft_slope_s=0.8, tpot_s=0.08, tpot_slope_s=0.05)
CPU_TARGETS = WindowTargets(ttft_s=1.2, tpot_s=0.15)
#: A GPU whose TTFT climbs steeply past 150 sequences (best window 156). (No model meets a
#: target exactly at a whole number of sequences: rounding would decide the best window.)
GPU = Knee(150, ttft_s=0.3, ttft_slope_s=0.05, tpot_s=0.02, tpot_slope_s=0.001)
#: The same GPU with a gentle slope: a wide band where latency is between 80% and 100% of
#: target (best window 182).
GPU_GENTLE = Knee(150, ttft_s=0.3, ttft_slope_s=0.01, tpot_s=0.02, tpot_slope_s=0.0005)
#: Decode bound: time per output token is what limits it (best window 160).
GPU_DECODE = Knee(150, ttft_s=0.3, ttft_slope_s=0.002, tpot_s=0.02, tpot_slope_s=0.002)
GPU_TARGETS = WindowTargets(ttft_s=0.625, tpot_s=0.041)


@dataclass
class Request:
    dispatched: float
    first_token_at: float
    tokens: int
    decoded: float = 0.0
    reported: int = 0
    reported_at: float | None = None  # None until its first token


@dataclass
class Upstream:
    """A simulated vLLM with a queue that never runs dry (up to ``demand`` requests).

    Every ``dt`` it advances each request: a first token after the model's TTFT (reported as
    the gateway measures it, dispatch to first event), then tokens at the model's TPOT for
    the current concurrency, reported in one-second batches. ``silent`` stops all reports
    (a hung upstream, or a gateway that lost track); ``model`` may be swapped mid-run;
    ``noise`` spreads each request's TTFT uniformly by that fraction either way (prompts of
    different lengths), from a seeded generator.
    """

    ctl: WindowController
    model: Knee
    demand: int = 10**9
    silent: bool = False
    noise: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    dt: float = 0.1
    lengths: tuple[int, ...] = (40, 80, 120, 160)  # tokens per answer, in turn
    sizes: list[int] = field(default_factory=list)  # the window after each tick
    steps: int = 0
    running: list[Request] = field(default_factory=list)
    started: int = 0

    def run(self, seconds: float) -> list[int]:
        """Simulate ``seconds`` more; the window after each of their ticks."""
        before = len(self.sizes)
        per_tick = round(1 / self.dt)
        for _ in range(round(seconds / self.dt)):
            self.steps += 1
            now = self.steps * self.dt  # integer steps: no drift in the clock
            self._advance(now)
            if self.steps % per_tick == 0:  # the gateway ticks, then dispatches into the window
                self.sizes.append(self.ctl.tick(now, len(self.running)))
            self._dispatch(now)
        return self.sizes[before:]

    def _advance(self, now: float) -> None:
        inflight, still = len(self.running), []
        for r in self.running:
            if r.reported_at is None:
                if now >= r.first_token_at - 1e-9:
                    # Reported at the instant it arrives, not at the end of the step: the
                    # gateway timestamps each event, and a coarse step would add up to dt.
                    r.reported_at = at = r.first_token_at
                    self._report_first_token(at, at - r.dispatched, inflight)
                still.append(r)
                continue
            tpot = self.model.tpot(inflight)
            r.decoded += self.dt / tpot
            finished = r.decoded >= r.tokens
            if finished or now - r.reported_at >= 1.0 - 1e-9:
                done = min(int(r.decoded), r.tokens)
                last_token_at = now - (r.decoded - done) * tpot  # tokens arrive whole
                if done > r.reported and not self.silent:
                    self.ctl.observe_tokens(
                        now, done - r.reported, last_token_at - r.reported_at, inflight
                    )
                r.reported, r.reported_at = done, last_token_at
            if not finished:
                still.append(r)
        self.running = still

    def _report_first_token(self, now: float, ttft: float, inflight: int) -> None:
        if not self.silent:
            self.ctl.observe_first_token(now, ttft, inflight)

    def _dispatch(self, now: float) -> None:
        new = max(0, min(self.ctl.size, self.demand) - len(self.running))
        # Requests sent together are prefilled together: all see the concurrency they make.
        ttft = self.model.ttft(len(self.running) + new)
        for _ in range(new):
            tokens = self.lengths[self.started % len(self.lengths)]
            spread = self.rng.uniform(1 - self.noise, 1 + self.noise)
            self.running.append(Request(now, now + ttft * spread, tokens))
            self.started += 1


def settled_after(sizes: list[int], low: int, high: int) -> int:
    """Ticks until the window entered ``[low, high]`` for good (len(sizes) if it never did)."""
    for i in range(len(sizes), 0, -1):
        if not low <= sizes[i - 1] <= high:
            return i
    return 0


def band(model: Knee, targets: WindowTargets, max_size: int) -> tuple[int, int]:
    """Where a settled window may be: where latency is between 80% of target (the growth
    margin: below it, it grows) and the target (above it, it shrinks), or one above the best
    while it probes."""
    best = model.best(targets, max_size)
    calm = model.best(WindowTargets(0.8 * targets.ttft_s, 0.8 * targets.tpot_s), max_size)
    return min(best, calm + 1), best + 1


# -- convergence ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "targets", "max_size", "best", "within_ticks"),
    [
        pytest.param(CPU, CPU_TARGETS, 16, 3, 5, id="cpu-knee-3"),
        pytest.param(GPU, GPU_TARGETS, 256, 156, 60, id="gpu-knee-150-steep"),
        pytest.param(GPU_GENTLE, GPU_TARGETS, 256, 182, 60, id="gpu-knee-150-gentle"),
        pytest.param(GPU_DECODE, GPU_TARGETS, 256, 160, 60, id="gpu-knee-150-decode-bound"),
    ],
)
def test_settles_at_the_largest_window_that_meets_the_targets(
    model: Knee, targets: WindowTargets, max_size: int, best: int, within_ticks: int
) -> None:
    assert model.best(targets, max_size) == best
    sizes = Upstream(WindowController(targets, max_size=max_size), model).run(300)
    low, high = band(model, targets, max_size)
    assert settled_after(sizes, low, high) <= within_ticks
    after = sizes[within_ticks:]
    # Mostly at or just under the best size: probes above it are short and rare.
    assert sum(s > best for s in after) <= 0.05 * len(after)
    assert sum(after) / len(after) >= 0.95 * best


@settings(max_examples=6, deadline=None)
@given(
    knee=st.integers(min_value=1, max_value=120),
    slope=st.sampled_from([0.01, 0.05, 0.3]),
    headroom=st.integers(min_value=0, max_value=100),
)
def test_settles_for_any_knee(knee: int, slope: float, headroom: int) -> None:
    model = Knee(knee, ttft_s=0.3, ttft_slope_s=slope, tpot_s=0.02, tpot_slope_s=slope / 20)
    max_size = knee + headroom + 1
    sizes = Upstream(WindowController(GPU_TARGETS, max_size=max_size), model).run(150)
    assert settled_after(sizes, *band(model, GPU_TARGETS, max_size)) <= 60


@pytest.mark.parametrize(
    ("model", "targets", "max_size"),
    [
        pytest.param(CPU, CPU_TARGETS, 16, id="cpu-knee-3"),
        pytest.param(GPU, GPU_TARGETS, 256, id="gpu-knee-150-steep"),
        pytest.param(GPU_GENTLE, GPU_TARGETS, 256, id="gpu-knee-150-gentle"),
    ],
)
def test_noisy_measurements_do_not_make_it_flap(
    model: Knee, targets: WindowTargets, max_size: int
) -> None:
    upstream = Upstream(WindowController(targets, max_size=max_size), model, noise=0.2)
    after = upstream.run(300)[60:]
    # Its p90 sees the slow end of the spread: it settles where that end meets the targets.
    slow = replace(model, ttft_s=1.2 * model.ttft_s, ttft_slope_s=1.2 * model.ttft_slope_s)
    low, high = band(slow, targets, max_size)
    assert all(low <= s <= max(high, model.best(targets, max_size) + 1) for s in after)
    changes = sum(a != b for a, b in itertools.pairwise(after))
    assert changes <= 10  # a few probes, no sawtooth


def test_opens_to_hundreds_within_a_minute_on_a_gpu() -> None:
    flat = Knee(10_000, ttft_s=0.3, ttft_slope_s=0.0, tpot_s=0.02, tpot_slope_s=0.0)
    sizes = Upstream(WindowController(GPU_TARGETS, max_size=256), flat).run(60)
    assert sizes[-1] == 256
    assert sizes.index(256) <= 55


# -- bounds --------------------------------------------------------------------------------

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["first", "tokens", "tick"]),
        st.floats(min_value=0.0, max_value=3.0),  # seconds since the previous event
        st.floats(min_value=0.0, max_value=20.0),  # a latency, wildly on either side
        st.integers(min_value=0, max_value=300),  # in flight, sometimes above max_size
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(
    events=EVENTS,
    min_size=st.integers(min_value=1, max_value=8),
    extra=st.integers(min_value=0, max_value=250),
)
def test_never_leaves_its_bounds_and_moves_by_bounded_steps(
    events: list[tuple[str, float, float, int]], min_size: int, extra: int
) -> None:
    max_size = min_size + extra
    ctl = WindowController(GPU_TARGETS, max_size=max_size, min_size=min_size)
    now = 0.0
    for kind, gap, latency, inflight in events:
        now += gap
        before = ctl.size
        if kind == "first":
            ctl.observe_first_token(now, latency, inflight)
        elif kind == "tokens":
            ctl.observe_tokens(now, max(1, round(latency * 10)), latency, inflight)
        else:
            after = ctl.tick(now, inflight)
            assert min_size <= after <= max_size
            assert after <= before + max(1, math.floor(0.1 * before))
            assert after >= min(before, max(min_size, math.floor(0.8 * before)))
        assert ctl.size == ctl.snapshot().size


def test_starts_at_four_or_as_told() -> None:
    assert WindowController(GPU_TARGETS, max_size=256).size == 4
    assert WindowController(GPU_TARGETS, max_size=2).size == 2
    assert WindowController(GPU_TARGETS, max_size=256, min_size=8).size == 8
    assert WindowController(GPU_TARGETS, max_size=256, initial=64).size == 64


@pytest.mark.parametrize(
    "make",
    [
        lambda: WindowController(GPU_TARGETS, max_size=0),
        lambda: WindowController(GPU_TARGETS, max_size=4, min_size=5),
        lambda: WindowController(GPU_TARGETS, max_size=4, initial=5),
        lambda: WindowTargets(ttft_s=0.0, tpot_s=0.1),
        lambda: WindowTuning(backoff=1.0),
        lambda: WindowTuning(min_samples=0),
        lambda: WindowTuning(probe_wait_s=60, max_probe_wait_s=30),
    ],
)
def test_rejects_settings_it_cannot_work_with(make: object) -> None:
    with pytest.raises(ValueError, match=r"."):
        make()  # type: ignore[operator]


# -- under-use -----------------------------------------------------------------------------


@pytest.mark.parametrize("demand", [0, 1, 3])
def test_an_idle_or_underused_window_does_not_grow(demand: int) -> None:
    """Latency is excellent, but never more than ``demand`` of 4 slots are used."""
    sizes = Upstream(WindowController(GPU_TARGETS, max_size=256), GPU, demand=demand).run(120)
    assert set(sizes) == {4}


def test_grows_with_demand_and_stops_where_demand_stops() -> None:
    upstream = Upstream(WindowController(GPU_TARGETS, max_size=256), GPU, demand=40)
    sizes = upstream.run(120)
    # 40 in flight make a window of 50 "nearly full" (80%): one more step (to 55), and no
    # further, since 40 of 55 is not.
    assert 40 <= sizes[-1] <= 55
    assert max(sizes) <= 55


# -- spikes and recovery -------------------------------------------------------------------


def test_a_slowdown_shrinks_it_and_it_recovers_after() -> None:
    upstream = Upstream(WindowController(GPU_TARGETS, max_size=256), GPU)
    upstream.run(120)
    assert band(GPU, GPU_TARGETS, 256)[0] <= upstream.ctl.size <= 156
    # Something else lands on the GPU: it now meets the targets only up to 66.
    upstream.model = Knee(60, ttft_s=0.3, ttft_slope_s=0.05, tpot_s=0.02, tpot_slope_s=0.001)
    slow_best = upstream.model.best(GPU_TARGETS, 256)
    during = upstream.run(60)
    assert slow_best == 66
    low, high = band(upstream.model, GPU_TARGETS, 256)
    assert settled_after(during, low, high) <= 30  # a cut every 5 s, each judged when drained
    assert min(during) >= 0.8 * low  # cut to fit, not collapsed
    upstream.model = GPU
    after = upstream.run(120)
    assert settled_after(after, *band(GPU, GPU_TARGETS, 256)) <= 45


def test_one_slow_burst_shrinks_it_once() -> None:
    ctl = WindowController(GPU_TARGETS, max_size=256, initial=100)
    steady(ctl, 0, 30, ttft=0.3, inflight=100)
    assert ctl.size > 100  # it was growing
    size = ctl.size
    # Three seconds of first tokens at three times the target, then normal again.
    steady(ctl, 30, 33, ttft=1.8, inflight=size)
    assert ctl.size == math.floor(0.8 * size)
    steady(ctl, 33, 36, ttft=0.3, inflight=ctl.size)
    assert ctl.size >= math.floor(0.8 * size)


def test_a_growth_that_goes_over_is_undone_at_once_and_retried_later() -> None:
    ctl = WindowController(CPU_TARGETS, max_size=16, initial=3)
    t = steady(ctl, 0, 5, ttft=0.6, inflight=3, tpot=0.08)
    assert ctl.size == 4
    t = steady(ctl, t, t + 3, ttft=1.4, inflight=4, tpot=0.13)  # 4 is too many
    assert ctl.size == 3
    assert ctl.snapshot().ceiling == 4
    t = steady(ctl, t, t + 25, ttft=0.6, inflight=3, tpot=0.08)
    assert ctl.size == 3  # it does not try 4 again for 30 s
    t = steady(ctl, t, t + 5, ttft=0.6, inflight=3, tpot=0.08)
    assert ctl.size == 4
    t = steady(ctl, t, t + 3, ttft=1.4, inflight=4, tpot=0.13)
    assert ctl.size == 3
    t = steady(ctl, t, t + 55, ttft=0.6, inflight=3, tpot=0.08)
    assert ctl.size == 3  # failed twice: now it waits 60 s
    steady(ctl, t, t + 6, ttft=0.6, inflight=3, tpot=0.08)
    assert ctl.size == 4


def test_latency_measured_above_the_window_does_not_shrink_it_further() -> None:
    """After a cut, the requests already running are still slow: that is not news."""
    ctl = WindowController(GPU_TARGETS, max_size=256, initial=100)
    steady(ctl, 0, 2, ttft=0.9, inflight=100)
    assert ctl.size == 80
    steady(ctl, 2, 30, ttft=0.9, inflight=100)  # still draining, 100 in flight
    assert ctl.size == 80


# -- stale and missing measurements --------------------------------------------------------


def test_stale_measurements_with_work_in_flight_shrink_it_to_the_minimum() -> None:
    ctl = WindowController(GPU_TARGETS, max_size=256, initial=150, min_size=2)
    t = steady(ctl, 0, 10, ttft=0.55, inflight=150)  # in the hold band
    assert ctl.size == 150
    sizes = [ctl.tick(now, 150) for now in range(t + 1, t + 200)]
    assert sizes[: int(ctl.stale_s) - 1] == [150] * (int(ctl.stale_s) - 1)  # silence is allowed
    assert ctl.snapshot().decision in (Decision.STALE, Decision.HOLD)
    assert sizes[int(ctl.stale_s)] == 120
    assert sizes[-1] == 2
    assert ctl.snapshot().ceiling is None  # silence is no evidence of a ceiling


def test_a_stalled_upstream_that_comes_back_regrows_fast() -> None:
    upstream = Upstream(WindowController(GPU_TARGETS, max_size=256), GPU)
    upstream.run(120)
    upstream.silent = True
    assert upstream.run(40)[-1] < 50
    upstream.silent = False
    assert settled_after(upstream.run(90), *band(GPU, GPU_TARGETS, 256)) <= 40


def test_nothing_in_flight_and_nothing_measured_holds() -> None:
    ctl = WindowController(GPU_TARGETS, max_size=256, initial=37)
    assert [ctl.tick(float(now), 0) for now in range(1, 1000)] == [37] * 999
    assert ctl.snapshot() == WindowSnapshot(37, Decision.HOLD, None, None, None)


def test_the_first_request_after_an_idle_spell_is_not_stale() -> None:
    ctl = WindowController(GPU_TARGETS, max_size=256, initial=20)
    t = steady(ctl, 0, 5, ttft=0.55, inflight=20)
    for now in range(t + 1, t + 60):
        ctl.tick(now, 0)
    # One request goes out; its first token is still under the stale limit away.
    for now in range(t + 60, t + 60 + int(ctl.stale_s)):
        assert ctl.tick(now, 1) == 20


def test_stale_limit_follows_the_ttft_target_with_a_floor() -> None:
    assert WindowController(WindowTargets(0.2, 0.05), max_size=8).stale_s == 5.0
    assert WindowController(WindowTargets(4.0, 0.05), max_size=8).stale_s == 12.0
    tuned = WindowController(GPU_TARGETS, max_size=8, tuning=WindowTuning(stale_s=2.0))
    assert tuned.stale_s == 2.0


# -- helpers -------------------------------------------------------------------------------


def steady(
    ctl: WindowController,
    start: int,
    end: int,
    *,
    ttft: float,
    inflight: int,
    tpot: float = 0.02,
) -> int:
    """Feed each second of ``[start, end)`` five first tokens and one second of decoding, all
    at ``inflight`` requests in flight, and tick at its end; returns ``end``."""
    for t in range(start, end):
        for i in range(1, 6):
            ctl.observe_first_token(t + 0.2 * i, ttft, inflight)
        ctl.observe_tokens(t + 1, round(1 / tpot), 1.0, inflight)
        ctl.tick(t + 1, inflight)
    return end
