"""The soak's verdict compares measured numbers: the second half's RSS slope, once full."""

from __future__ import annotations

import random

import pytest

from loadtest.soak_verdict import Point, fit, judge, rings_full_at

FULL = {"sentiment": 8, "chat": 8}


def run(
    minutes: int, mib_per_min: float, rings: dict[str, int] | None = None, noise_kib: int = 0
) -> list[Point]:
    """Samples every 10 s of a load whose RSS grows at ``mib_per_min``."""
    rng = random.Random(1)
    return [
        Point(
            t_s=10.0 * i,
            rss_kib=50_000 + round(mib_per_min * 1024 * i / 6) + rng.randint(-noise_kib, noise_kib),
            rings=rings if rings is not None else FULL,
        )
        for i in range(minutes * 6 + 1)
    ]


def test_the_fit_is_least_squares_with_its_standard_error() -> None:
    exact = fit([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0])
    assert exact is not None
    assert (exact.slope, exact.stderr) == (2.0, 0.0)
    assert fit([0.0, 1.0], [0.0, 1.0]) is None


def test_flat_memory_passes_despite_noise() -> None:
    verdict = judge(run(20, 0.0, noise_kib=300), per_task=8, time_bound_s=600)
    assert verdict.result == "PASS"
    assert verdict.exit_code == 0
    assert verdict.slope_mib_per_min is not None
    assert abs(verdict.slope_mib_per_min) < 0.05
    assert verdict.judged_from_s == 600.0
    assert verdict.judged_to_s == 1200.0
    assert verdict.line().startswith("verdict: PASS: second-half RSS slope")


def test_steady_growth_fails() -> None:
    verdict = judge(run(20, 0.4), per_task=8, time_bound_s=600)
    assert verdict.result == "FAIL"
    assert verdict.exit_code == 1
    assert verdict.slope_mib_per_min == pytest.approx(0.4, abs=0.01)
    assert "> 0.05 MiB/min" in verdict.reason


def test_growth_just_above_the_limit_fails() -> None:
    assert judge(run(60, 0.06), per_task=8, time_bound_s=600).result == "FAIL"


def test_rings_filling_after_half_time_cannot_be_judged() -> None:
    points = run(20, 0.0)
    points = [
        Point(p.t_s, p.rss_kib, {"sentiment": 8, "chat": 8 if p.t_s >= 900 else 5}) for p in points
    ]
    assert rings_full_at(points, 8) == {"chat": 900.0, "sentiment": 0.0}
    verdict = judge(points, per_task=8, time_bound_s=600)
    assert verdict.result == "INCONCLUSIVE"
    assert verdict.exit_code == 2
    assert verdict.full_at_s == 900.0
    assert "run at least 30 min" in verdict.reason
    assert "the second-half slope, not judged: +0.000" in verdict.reason


def test_a_ring_never_full_or_a_long_queue_deadline_cannot_be_judged() -> None:
    never = judge(run(20, 0.0, {"batch": 3, "chat": 8}), per_task=8, time_bound_s=600)
    assert never.result == "INCONCLUSIVE"
    assert never.full_at_s is None
    assert "batch never" in never.reason
    short = judge(run(10, 0.0), per_task=8, time_bound_s=600)  # half time is 5 min
    assert short.result == "INCONCLUSIVE"
    assert "run at least 20 min" in short.reason


def test_unknown_ring_fill_cannot_be_judged() -> None:
    """No /status.json readings: nothing says the rings were full."""
    assert judge(run(20, 0.0, {}), per_task=0, time_bound_s=600).result == "INCONCLUSIVE"
