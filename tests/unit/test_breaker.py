"""The circuit breaker on its own: states, cool-downs and what resets them, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.breaker import Breaker, BreakerPolicy, BreakerState

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


def tripped(now: float = 0.0, policy: BreakerPolicy | None = None) -> Breaker:
    breaker = Breaker(policy)
    for _ in range(breaker.policy.failures):
        breaker.failure(now)
    return breaker


def test_opens_after_n_consecutive_failures_only() -> None:
    breaker = Breaker()
    breaker.failure(0)
    breaker.failure(0)
    breaker.success(0)  # a success in between: the count starts again
    assert breaker.state(0) is CLOSED
    breaker.failure(0)
    breaker.failure(0)
    assert breaker.state(0) is CLOSED
    breaker.failure(0)
    assert breaker.state(0) is OPEN
    assert breaker.retry_at == 5.0


def test_health_checks_and_requests_keep_separate_streaks() -> None:
    busy = Breaker()
    busy.failure(0, probe=True)
    busy.failure(0, probe=True)
    busy.success(1, probe=True)  # a slow health check, then a good one: no verdict
    busy.failure(2, probe=True)
    busy.failure(2, probe=True)
    assert busy.state(2) is CLOSED
    busy.failure(2, probe=True)
    assert busy.state(2) is OPEN

    sick = Breaker()  # /health answers, completions fail
    for _ in range(3):
        sick.success(0, probe=True)
        sick.failure(0)
    assert sick.state(0) is OPEN

    mixed = Breaker()
    mixed.failure(0)
    mixed.failure(0, probe=True)
    mixed.failure(0, probe=True)
    mixed.success(0)  # a real answer ends both streaks
    mixed.failure(0)
    mixed.failure(0, probe=True)
    mixed.failure(0)
    assert mixed.state(0) is CLOSED


def test_open_turns_half_open_when_the_cool_down_ends() -> None:
    breaker = tripped(now=10)
    assert breaker.state(14.9) is OPEN
    assert breaker.state(15.0) is HALF_OPEN


def test_a_successful_probe_closes_it() -> None:
    breaker = tripped()
    breaker.success(5, probe=True)
    assert breaker.state(5) is CLOSED
    assert breaker.failures == breaker.probe_failures == 0


def test_a_failed_probe_reopens_with_a_doubled_cool_down_up_to_the_cap() -> None:
    breaker = tripped()
    now, cooldowns = 0.0, []
    for _ in range(7):
        assert breaker.retry_at is not None
        cooldowns.append(breaker.retry_at - now)
        now = breaker.retry_at
        assert breaker.state(now) is HALF_OPEN
        breaker.failure(now, probe=True)  # one failed probe is enough in half-open
        assert breaker.state(now) is OPEN
    assert cooldowns == [5, 10, 20, 40, 60, 60, 60]


def test_while_open_late_answers_change_nothing() -> None:
    breaker = tripped()
    breaker.success(1)  # a request sent before it opened, answering late
    breaker.failure(2)
    assert breaker.state(4.9) is OPEN
    assert breaker.retry_at == 5.0
    assert breaker.trips == 1


def test_only_real_traffic_resets_the_doubling() -> None:
    breaker = tripped()
    breaker.success(5, probe=True)  # health check passes...
    for _ in range(3):
        breaker.failure(6)  # ...but requests keep failing
    assert breaker.retry_at == 6 + 10  # second trip in a row: doubled
    breaker.success(16, probe=True)
    breaker.success(17)  # a real answer: the upstream works again
    for _ in range(3):
        breaker.failure(18)
    assert breaker.retry_at == 18 + 5


def test_a_real_success_in_half_open_closes_it() -> None:
    breaker = tripped()
    breaker.success(6)
    assert breaker.state(6) is CLOSED
    assert breaker.trips == 0


def test_custom_policy_and_validation() -> None:
    policy = BreakerPolicy(failures=1, cooldown_s=0.5, max_cooldown_s=1.5)
    breaker = tripped(policy=policy)
    assert breaker.retry_at == 0.5
    assert [policy.cooldown(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    for bad in ({"failures": 0}, {"cooldown_s": 0}, {"cooldown_s": 10, "max_cooldown_s": 5}):
        with pytest.raises(ValueError, match="invalid breaker policy"):
            BreakerPolicy(**bad)  # type: ignore[arg-type]


@given(
    st.lists(
        st.tuples(
            st.floats(0, 5, allow_nan=False),
            st.sampled_from(["ok", "probe ok", "fail", "probe fail"]),
        ),
        max_size=60,
    )
)
def test_invariants_under_any_sequence(events: list[tuple[float, str]]) -> None:
    """Whatever happens: closed iff no retry time, cool-downs within bounds, time only opens."""
    breaker, now = Breaker(), 0.0
    for step, kind in events:
        now += step
        before = breaker.state(now)
        probe = kind.startswith("probe")
        if kind.endswith("fail"):
            breaker.failure(now, probe=probe)
        else:
            breaker.success(now, probe=probe)
        state = breaker.state(now)
        assert (state is CLOSED) == (breaker.retry_at is None)
        assert 0 <= breaker.failures < breaker.policy.failures
        assert 0 <= breaker.probe_failures < breaker.policy.failures
        if breaker.retry_at is not None:
            assert 0 <= breaker.retry_at - now <= breaker.policy.max_cooldown_s
        if before is OPEN:
            assert state is OPEN  # nothing but time ends an open breaker
        if kind.endswith("ok") and before is not OPEN:
            assert state is CLOSED
