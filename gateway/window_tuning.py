"""The adaptive window's settings and reports: its targets, its tuning, what it decided.

Plain values for :mod:`gateway.window` (kept apart so the controller's logic reads on its
own); the constants' reasons are next to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

#: How a gateway sizes its windows: measured (``adaptive``) or always ``--window``.
WindowMode = Literal["adaptive", "fixed"]


class Decision(StrEnum):
    """What the last :meth:`WindowController.tick` did; a bounded label for logs and metrics."""

    START = "start"
    HOLD = "hold"
    GROW = "grow"
    REVERT = "revert"  # a growth that put latency over target, undone
    SHRINK = "shrink"  # latency over target
    STALE = "stale"  # work in flight and no measurement: treated as over target


@dataclass(frozen=True, slots=True)
class WindowTargets:
    """The latency the window must keep: the tightest class's, e.g.
    ``WindowTargets(ttft_s=1.0, tpot_s=0.1)``.

    ``ttft_s`` bounds a high percentile (``WindowTuning.quantile``) of time to first token as
    the gateway measures it (dispatch to first streamed event); ``tpot_s`` bounds the mean
    time per output token while decoding.
    """

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"window targets must be positive: {self}")


@dataclass(frozen=True, slots=True)
class WindowTuning:
    """How fast the window moves, e.g. ``WindowTuning(growth=0.2)``. The defaults suit both
    a CPU that settles at a handful of sequences and a GPU that opens to hundreds.
    """

    #: Sliding window of samples: on a GPU, a few hundred of them, a stable percentile; short
    #: enough that a change of load shows within a few ticks. A CPU at a window of one or two
    #: finishes fewer than ``min_samples`` requests in it, and is judged on its newest
    #: ``min_samples`` instead, however old (they were still measured at the current size).
    horizon_s: float = 10.0
    #: TTFT is judged on its p90: SLAs are stated on a high percentile (the status page checks
    #: p95), but a p95 is just the maximum of the samples until there are twenty of them (a
    #: p90 until ten), and a CPU yields fewer than that. The growth margin covers the gap.
    quantile: float = 0.9
    #: Grow only while latency is at most this fraction of its target. The band between it and
    #: the target is where the window holds still, so measurement noise does not make it flap,
    #: and the operating point stays under the target instead of on it.
    margin: float = 0.8
    #: Additive growth per step, as a fraction of the size (at least one slot). 10% per second
    #: takes a GPU from 4 to 150 in about 40 steps and to 256 in under 50: tens of seconds,
    #: and each step small enough that one failed probe costs little.
    growth: float = 0.1
    #: Multiplicative decrease when latency is over target: 0.8 cuts a fifth, enough to get out
    #: of a queueing knee in a step or two, gentle enough that one bad reading does not halve
    #: throughput (AIMD's classic 0.5 is tuned for packet loss, a much harsher signal).
    backoff: float = 0.8
    #: At most one multiplicative decrease per cooldown: a slow burst (a few long prompts
    #: prefilled together on a CPU lasts seconds) shrinks the window once, not once per tick,
    #: and a shrink gets time to drain before it is judged.
    cooldown_s: float = 5.0
    #: Growth at most once per this interval, however often :meth:`WindowController.tick` is
    #: called: the new slots must be filled and a few decode steps run before the latency
    #: they cause can be measured.
    grow_interval_s: float = 1.0
    #: A sample counts as taken on a used window when at least this fraction of the window
    #: was in flight. 0.8 means "full" for windows up to 4 and leaves a little slack on big
    #: ones, where a window is rarely exactly full at the instant a token arrives.
    used: float = 0.8
    #: Fewest samples to judge a signal by, so that no lone reading moves the window (except
    #: a probe's first first token: see the module docstring). At a window of three on a CPU
    #: they take a few seconds; at a window of one, tens of seconds, which paces growth there.
    min_samples: int = 3
    #: Keep at most this many samples per signal: a stable p90 with bounded memory and tick
    #: cost, even with hundreds of streams each reporting every second.
    max_samples: int = 1024
    #: After a size fails, stay below it this long before probing it again. A failed probe
    #: costs a few seconds over target; once per 30 s it stays a small share of the time
    #: while still noticing within half a minute that the upstream got faster.
    probe_wait_s: float = 30.0
    #: Each failed probe at the same ceiling doubles the wait, up to this: an upstream with a
    #: hard cliff (a CPU at its core count) is probed once every few minutes.
    max_probe_wait_s: float = 300.0
    #: Requests in flight and no sample for this long counts as over target. None derives it
    #: from the targets: ``max(5 s, 3 * ttft_s)``. A healthy upstream gives a first token
    #: within ``ttft_s`` and a token batch about every second per stream, so three TTFT
    #: targets of silence means even new requests are far over target; the 5 s floor keeps a
    #: tight target from mistaking ordinary gaps (a GC pause, a slow batch) for a stall.
    stale_s: float | None = None

    def __post_init__(self) -> None:
        fractions = (self.quantile, self.margin, self.growth, self.backoff, self.used)
        durations = (self.horizon_s, self.cooldown_s, self.grow_interval_s, self.probe_wait_s)
        if not all(0 < f <= 1 for f in fractions) or self.backoff == 1:
            raise ValueError(f"window tuning fractions must be in (0, 1]: {self}")
        if not all(d > 0 for d in durations) or self.max_probe_wait_s < self.probe_wait_s:
            raise ValueError(f"window tuning durations must be positive: {self}")
        if self.min_samples < 1 or self.max_samples < self.min_samples:
            raise ValueError(f"window tuning sample counts are inconsistent: {self}")
        if self.stale_s is not None and self.stale_s <= 0:
            raise ValueError(f"window tuning stale_s must be positive: {self}")


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """The controller's state for metrics and the status page (``gateway_window_size`` is
    ``size``). ``ttft_s`` and ``tpot_s`` are the readings of the last tick, None without
    enough samples; ``ceiling`` is the smallest size known to fail, if any.
    """

    size: int
    decision: Decision
    ttft_s: float | None
    tpot_s: float | None
    ceiling: int | None
