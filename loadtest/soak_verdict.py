"""The soak's verdict: is the gateway's memory flat once everything it may keep is full?

The gateway keeps some state about past requests on purpose, each piece with a bound: the
status page's rings hold the last ``per_task`` finished requests of each task (full after
so many requests), and a request's ticket may be tracked until its queue deadline (full after
the longest queue deadline of the tasks the mix uses). While these fill, RSS rises by design.
So the verdict looks at the second half of the load, and counts only if everything bounded
was full when that half began:

    PASS          the second half's RSS slope (least squares, MiB/min) is at most the limit
    FAIL          it is above the limit
    INCONCLUSIVE  something bounded was still filling at half time: it says how long to run

The limit, 0.05 MiB/min, is 3 MiB an hour and 72 MiB a day. The slope's standard error is
reported next to it, so a slope that passes or fails by less than its own noise shows as such.

    >>> points = [Point(60.0 * m, 50_000 + 10 * m, {"chat": 8}) for m in range(21)]
    >>> judge(points, per_task=8, time_bound_s=600).result
    'PASS'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LIMIT_MIB_PER_MIN = 0.05


@dataclass(frozen=True, slots=True)
class Point:
    """One sample of the load: seconds since it started, RSS, and each task's ring fill."""

    t_s: float
    rss_kib: int
    rings: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Fit:
    slope: float
    stderr: float


def fit(xs: Sequence[float], ys: Sequence[float]) -> Fit | None:
    """Least-squares slope of ys over xs and its standard error; None below three points."""
    n = len(xs)
    if n < 3 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    residuals = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return Fit(slope, math.sqrt(residuals / (n - 2) / sxx))


def rings_full_at(points: Sequence[Point], per_task: int) -> dict[str, float | None]:
    """When each task's ring (any seen in the run) first held ``per_task`` requests."""
    tasks = sorted({task for p in points for task in p.rings})
    return {
        task: next((p.t_s for p in points if p.rings.get(task, 0) >= per_task), None)
        for task in tasks
    }


@dataclass(frozen=True, slots=True)
class Verdict:
    result: str  # PASS, FAIL or INCONCLUSIVE
    limit_mib_per_min: float
    slope_mib_per_min: float | None  # over the second half
    stderr_mib_per_min: float | None
    judged_from_s: float
    judged_to_s: float
    judged_samples: int
    rings_full_at_s: dict[str, float | None]
    time_bound_s: float
    full_at_s: float | None  # when everything bounded was full (None: not in this run)
    reason: str

    @property
    def exit_code(self) -> int:
        return {"PASS": 0, "FAIL": 1}.get(self.result, 2)

    def line(self) -> str:
        return f"verdict: {self.result}: {self.reason}"


def judge(
    points: Sequence[Point],
    per_task: int,
    time_bound_s: float,
    limit: float = LIMIT_MIB_PER_MIN,
) -> Verdict:
    """The verdict on a load's samples (in time order, the load only, not the idle ones)."""
    start, end = points[0].t_s, points[-1].t_s
    half = start + (end - start) / 2
    judged = [p for p in points if p.t_s >= half]
    rings = rings_full_at(points, per_task)
    ring_times = list(rings.values())
    full_at = (
        None
        if not ring_times or None in ring_times
        else max([time_bound_s, *(t for t in ring_times if t is not None)])
    )
    line = fit([p.t_s / 60 for p in judged], [p.rss_kib / 1024 for p in judged])
    slope = None if line is None else line.slope
    stderr = None if line is None else line.stderr
    filled = ", ".join(f"{task} {_min(t)}" for task, t in rings.items()) or "none seen"
    where = (
        f"rings of {per_task} full at: {filled}; tickets tracked up to {_min(time_bound_s)}"
        " (the longest queue deadline)"
    )
    if slope is None:
        result, reason = "INCONCLUSIVE", f"too few samples in the second half; {where}"
    elif full_at is None or full_at > half:
        need = "" if full_at is None else f"; run at least {2 * full_at / 60:.0f} min"
        result = "INCONCLUSIVE"
        reason = (
            f"something bounded was still filling at half time ({_min(half)}){need}; {where}; "
            f"the second-half slope, not judged: {slope:+.3f} ± {stderr:.3f} MiB/min"
        )
    else:
        result = "PASS" if slope <= limit else "FAIL"
        reason = (
            f"second-half RSS slope {slope:+.3f} ± {stderr:.3f} MiB/min "
            f"{'<=' if slope <= limit else '>'} {limit} MiB/min ({_min(half)} to {_min(end)}, "
            f"{len(judged)} samples); everything bounded was full at {_min(full_at)}: {where}"
        )
    return Verdict(
        result, limit, _round(slope), _round(stderr), round(half, 1), round(end, 1), len(judged),
        rings, time_bound_s, full_at, reason,
    )  # fmt: skip


def _min(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds / 60:.1f} min"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
