"""The pure scheduling core: ordering, aging, headroom, bounds, shedding, expiry.

No sleeps: every call takes ``now``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.classes import DEFAULT_POLICIES, ClassPolicy, ClassTable
from gateway.routing import Router, hash_order
from gateway.scheduler import (
    Admitted,
    Dispatch,
    Expiry,
    Preempt,
    Rejected,
    Scheduler,
    State,
    Ticket,
    Window,
)

CLASSES = ClassTable(DEFAULT_POLICIES)
#: The classes without their admission limit (max_wait_s), for tests of ordering alone.
UNBOUNDED = ClassTable(replace(p, max_wait_s=math.inf) for p in DEFAULT_POLICIES)
RT, INTER, STD, BATCH, BG = (CLASSES[n] for n in CLASSES.names())


def ticket(
    policy: ClassPolicy, arrival: float, queue_s: float = 1e9, total_s: float = 1e9, **kw: object
) -> Ticket:
    kw.setdefault("task", policy.name)
    return Ticket(
        policy=policy,
        arrival=arrival,
        queue_deadline=arrival + queue_s,
        deadline=arrival + total_s,
        **kw,  # type: ignore[arg-type]
    )


def scheduler(
    window: int = 1, max_queued: int = 512, classes: ClassTable = CLASSES, upstreams: int = 1
) -> Scheduler:
    return Scheduler(classes, max_queued, [Window(f"u{i}", window) for i in range(upstreams)])


def dispatched(items: list[Dispatch | Expiry]) -> list[Ticket]:
    return [i.ticket for i in items if isinstance(i, Dispatch)]


def admit_all(s: Scheduler, tickets: list[Ticket], now: float) -> None:
    for t in tickets:
        assert isinstance(s.admit(t, now), Admitted)


def test_idle_window_dispatches_at_once_with_the_head_start_as_priority() -> None:
    s = scheduler(window=2)
    t = ticket(BATCH, arrival=0.0)
    s.admit(t, 0.0)
    assert dispatched(s.dispatch(0.5)) == [t]
    assert t.state is State.DISPATCHED
    assert t.upstream == "u0"
    assert t.effective_priority == BATCH.head_start_s + 0.5


def test_more_important_class_goes_first_when_a_slot_frees() -> None:
    s = scheduler(window=1)
    running = ticket(BATCH, 0.0)
    s.admit(running, 0.0)
    s.dispatch(0.0)
    queued = [ticket(BATCH, 1.0), ticket(STD, 2.0), ticket(RT, 3.0), ticket(INTER, 4.0)]
    admit_all(s, queued, 4.0)
    order = []
    s.release(running, 5.0)
    for now in (5.0, 6.0, 7.0, 8.0):
        (t,) = dispatched(s.dispatch(now))
        order.append(t.policy.name)
        s.release(t, now + 0.5)
    assert order == ["realtime", "interactive", "standard", "batch"]


def test_within_a_class_first_come_first_served() -> None:
    s = scheduler(window=1)
    blocker = ticket(RT, 0.0)
    s.admit(blocker, 0.0)
    s.dispatch(0.0)
    a, b = ticket(STD, 1.0), ticket(STD, 2.0)
    admit_all(s, [b, a], 2.0)  # admitted out of order: the key still orders them
    s.release(blocker, 3.0)
    assert dispatched(s.dispatch(3.0)) == [a]


def test_aging_lets_a_waiting_batch_request_overtake_fresh_realtime_work() -> None:
    s = scheduler(window=1)
    blocker = ticket(RT, 0.0)
    s.admit(blocker, 0.0)
    s.dispatch(0.0)
    old_batch = ticket(BATCH, 0.0)
    gap = RT.head_start_s - BATCH.head_start_s
    fresh_rt = ticket(RT, gap + 1.0)
    admit_all(s, [old_batch, fresh_rt], gap + 1.0)
    s.release(blocker, gap + 1.0)
    assert dispatched(s.dispatch(gap + 1.0)) == [old_batch]
    assert old_batch.boosted  # a more important request was still waiting
    assert old_batch.effective_priority > RT.head_start_s


def test_headroom_keeps_slots_for_more_important_classes() -> None:
    s = scheduler(window=8)
    batch = [ticket(BATCH, float(i)) for i in range(12)]
    admit_all(s, batch, 0.0)
    running = dispatched(s.dispatch(12.0))
    assert len(running) == 8 - BATCH.reserved_slots(8)  # batch leaves its reserve free
    rt = ticket(RT, 12.0)
    s.admit(rt, 12.0)
    assert dispatched(s.dispatch(12.0)) == [rt]  # a reserved slot, no waiting for batch


def test_a_promoted_request_may_use_reserved_slots() -> None:
    """Under realtime saturation the window is always nearly full; aging must still win."""
    s = scheduler(window=4)
    realtime = [ticket(RT, 0.0) for _ in range(4)]
    admit_all(s, realtime, 0.0)
    s.dispatch(0.0)
    old = ticket(BG, 0.0)
    s.admit(old, 0.0)
    late = RT.head_start_s - BG.head_start_s + 1.0
    more_rt = ticket(RT, late)
    s.admit(more_rt, late)
    s.release(realtime[0], late)  # 3 of 4 in flight: background alone could not enter
    assert dispatched(s.dispatch(late)) == [old]


def test_reserved_slots_never_take_the_whole_window() -> None:
    assert BG.reserved_slots(1) == 0
    assert BG.reserved_slots(8) == 4
    assert INTER.reserved_slots(8) == 1
    assert RT.reserved_slots(64) == 0


def test_class_queue_bound_rejects_with_reason_and_retry_after() -> None:
    classes = ClassTable(
        [
            p if p.name != "batch" else ClassPolicy("batch", 3, 10.0, 0.3, max_queued=2)
            for p in DEFAULT_POLICIES
        ]
    )
    s = scheduler(window=1, classes=classes)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    admit_all(s, [ticket(classes["batch"], 0.0), ticket(classes["batch"], 0.0)], 0.0)
    result = s.admit(ticket(classes["batch"], 0.0), 0.0)
    assert isinstance(result, Rejected)
    assert result.reason == "class_queue_full"
    assert result.retry_after_s >= 1


def test_full_queue_sheds_the_newest_of_the_least_important_class() -> None:
    s = scheduler(window=1, max_queued=3)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    old_bg, batch, new_bg = ticket(BG, 1.0), ticket(BATCH, 2.0), ticket(BG, 3.0)
    admit_all(s, [old_bg, batch, new_bg], 3.0)
    result = s.admit(ticket(STD, 4.0), 4.0)
    assert isinstance(result, Admitted)
    assert result.shed == (new_bg,)
    assert new_bg.state is State.SHED
    assert s.queued == 3


def test_full_queue_rejects_when_nothing_less_important_waits() -> None:
    s = scheduler(window=1, max_queued=2)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    admit_all(s, [ticket(STD, 1.0), ticket(STD, 1.0)], 1.0)
    result = s.admit(ticket(STD, 2.0), 2.0)
    assert isinstance(result, Rejected)
    assert result.reason == "queue_full"
    assert isinstance(s.admit(ticket(BG, 2.0), 2.0), Rejected)  # cannot shed its betters


def test_queue_deadline_expires_without_dispatch() -> None:
    s = scheduler(window=1)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    late = ticket(STD, 0.0, queue_s=2.0)
    s.admit(late, 0.0)
    assert s.next_expiry() == 2.0
    assert s.expire(1.9) == []
    (expiry,) = s.expire(2.0)
    assert expiry.ticket is late
    assert expiry.stage == "queue"
    assert late.state is State.EXPIRED
    assert s.queued == 0
    assert s.next_expiry() is None


def test_too_little_budget_left_expires_at_dispatch_stage() -> None:
    s = scheduler(window=1)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    t = ticket(STD, 0.0, queue_s=10.0, total_s=5.0, need_s=2.0)
    s.admit(t, 0.0)
    assert s.next_expiry() == 3.0  # 5 s budget minus 2 s it needs
    (expiry,) = [i for i in s.dispatch(3.0) if isinstance(i, Expiry)]
    assert expiry.stage == "dispatch"


def test_withdraw_removes_a_queued_ticket() -> None:
    s = scheduler(window=1)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    t = ticket(STD, 0.0)
    s.admit(t, 0.0)
    s.withdraw(t)
    assert s.queued == 0
    assert t.state is State.WITHDRAWN


def test_unusable_upstream_gets_nothing_and_least_loaded_wins() -> None:
    s = scheduler(window=4, upstreams=2)
    s.windows["u0"].usable = False
    t1, t2 = ticket(RT, 0.0), ticket(RT, 0.0)
    admit_all(s, [t1, t2], 0.0)
    s.dispatch(0.0)
    assert t1.upstream == t2.upstream == "u1"
    s.windows["u0"].usable = True
    t3 = ticket(RT, 0.0)
    s.admit(t3, 0.0)
    s.dispatch(0.0)
    assert t3.upstream == "u0"


def test_one_tasks_requests_go_to_one_upstream_and_two_tasks_spread() -> None:
    """Affinity (the default): each task keeps to its home while the load guard allows."""
    s = scheduler(window=8, upstreams=2)
    homes = {hash_order(f"task-{i}", ("u0", "u1"))[0]: f"task-{i}" for i in range(50)}
    a, b = homes["u0"], homes["u1"]  # two tasks with different homes (found, not assumed)
    for n in range(3):
        t = ticket(INTER, float(n), task=a)
        s.admit(t, float(n))
        assert [d.upstream for d in dispatched(s.dispatch(float(n)))] == ["u0"]
        s.release(t, float(n))  # done before the next: the load stays even
    ts = [ticket(INTER, 3.0, task=a), ticket(INTER, 3.0, task=b), ticket(INTER, 3.0, task=b)]
    admit_all(s, ts, 3.0)
    assert [t.upstream for t in dispatched(s.dispatch(3.0))] == ["u0", "u1", "u1"]


def test_a_hot_task_spills_past_the_margin_and_least_loaded_ignores_the_task() -> None:
    s = scheduler(window=4, upstreams=2)
    task = next(f"task-{i}" for i in range(50) if hash_order(f"task-{i}", ("u0", "u1"))[0] == "u1")
    ts = [ticket(INTER, 0.0, task=task) for _ in range(4)]
    admit_all(s, ts, 0.0)
    s.dispatch(0.0)
    # u1, u1 (1/4 busier: within the margin), then 2/4 vs 0/4 spills, then u1 again
    assert [t.upstream for t in ts] == ["u1", "u1", "u0", "u1"]

    flat = Scheduler(
        CLASSES, 512, [Window("u0", 4), Window("u1", 4)], router=Router("least-loaded")
    )
    ts = [ticket(INTER, 0.0, task=task) for _ in range(4)]
    admit_all(flat, ts, 0.0)
    flat.dispatch(0.0)
    assert [t.upstream for t in ts] == ["u0", "u1", "u0", "u1"]


def test_external_load_reported_by_the_upstream_limits_the_window() -> None:
    s = scheduler(window=4)
    s.windows["u0"].external = 4  # another gateway fills this vLLM
    t = ticket(RT, 0.0)
    s.admit(t, 0.0)
    assert dispatched(s.dispatch(0.0)) == []


def test_with_leases_a_lagging_scrape_does_not_hold_slots_the_leases_gave() -> None:
    """With Redis the other gateways are counted exactly (``shared``); what vLLM's gauge shows
    beyond that is clients that are not gateways, or the gauge lagging behind requests that
    just ended. Holding that count at its peak for seconds kept gateway B out of the two slots
    its lease gave it while gateway A ran its second round (a fresh-clone run: B's requests
    started only after all of A's had ended). With a lease the latest reading counts; without
    one, the recent peak (another gateway's refill gap must not look free)."""
    window = Window("u0", 4, lease=2, shared=2)
    window.see_others(latest=0, peak=2)  # the gauge still showed A's finished round
    assert window.external == 0
    assert window.has_room(0)
    alone = Window("u0", 4)
    alone.see_others(latest=0, peak=2)
    assert alone.external == 2


def test_predicted_wait_and_retry_after_follow_the_drain_rate() -> None:
    s = scheduler(window=1)
    assert s.predicted_wait(STD, 0.0) == 0.0  # a free slot: no wait
    now = 0.0
    s.admit(ticket(RT, now), now)
    (running,) = dispatched(s.dispatch(now))
    assert s.predicted_wait(STD, now) == 0.0  # full, but nothing has completed: no evidence
    for _ in range(10):  # one completion every 0.5 s: 2 per second
        now += 0.5
        s.admit(ticket(RT, now), now)
        s.release(running, now)
        (running,) = dispatched(s.dispatch(now))
    admit_all(s, [ticket(STD, now) for _ in range(5)], now)
    # 5 queued ahead of a new standard request, draining at 2/s: about 3 s.
    assert 2.0 <= s.predicted_wait(STD, now) <= 4.0
    assert s.predicted_wait(RT, now) < s.predicted_wait(BG, now)
    assert 2 <= s.retry_after(STD, now) <= 4


# -- autoscaling signals -----------------------------------------------------------------------


def test_oldest_wait_is_the_age_of_the_oldest_queued_request_per_class() -> None:
    s = scheduler(window=1)
    assert s.oldest_wait("batch", now=5.0) == 0.0  # nothing queued: 0, not a gap
    admit_all(s, [ticket(BATCH, 1.0), ticket(BATCH, 2.0), ticket(RT, 3.0)], now=3.0)
    assert s.oldest_wait("batch", now=10.0) == 9.0
    assert s.oldest_wait("realtime", now=10.0) == 7.0
    (first,) = dispatched(s.dispatch(10.0))  # realtime goes first: its head start
    assert first.policy is RT
    assert s.oldest_wait("realtime", now=10.0) == 0.0
    assert s.oldest_wait("batch", now=12.0) == 11.0
    s.release(first, 12.0)
    (second,) = dispatched(s.dispatch(12.0))
    assert second.arrival == 1.0
    assert s.oldest_wait("batch", now=12.0) == 10.0  # now the one that arrived at 2.0


def test_saturation_is_held_work_over_usable_window_slots() -> None:
    s = scheduler(window=2, upstreams=2)
    assert s.saturation() == 0.0
    admit_all(s, [ticket(RT, float(i)) for i in range(6)], now=6.0)
    assert s.saturation() == 6 / 4  # queued counts before dispatch too
    assert len(dispatched(s.dispatch(6.0))) == 4
    assert s.saturation() == 6 / 4  # 4 in flight + 2 queued over 4 slots
    s.windows["u0"].size = 1  # an adaptive window shrunk by latency takes less
    assert s.saturation() == 6 / 3
    s.windows["u1"].external = 5  # other clients' load is not ours: unchanged
    assert s.saturation() == 6 / 3
    s.windows["u1"].usable = False  # a down upstream's slots are gone; its requests still count
    assert s.saturation() == 6 / 1
    s.windows["u0"].usable = False  # nothing usable: one slot, so finite and growing with work
    assert s.saturation() == 6.0


def test_saturation_below_one_while_a_class_waits_behind_reserved_slots() -> None:
    """Why the ratio is not the only signal: batch may not take the slots kept for more
    important classes (3 of 8 here), so it waits at a ratio under 1; its oldest wait shows it."""
    s = scheduler(window=8)
    admit_all(s, [ticket(BATCH, float(i)) for i in range(6)], now=6.0)
    assert len(dispatched(s.dispatch(6.0))) == 5
    assert s.saturation() == 6 / 8
    assert s.depth("batch") == 1
    assert s.oldest_wait("batch", now=20.0) == 15.0  # the one that arrived at 5.0


# -- properties ---------------------------------------------------------------------------

arrivals = st.lists(
    st.tuples(st.sampled_from(CLASSES.names()), st.floats(min_value=0, max_value=100)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(arrivals, st.integers(min_value=1, max_value=8))
def test_dispatch_order_is_by_effective_priority(
    items: list[tuple[str, float]], window: int
) -> None:
    """With one slot, each dispatch takes the waiting ticket with the highest aged priority."""
    s = scheduler(window=1, classes=UNBOUNDED)  # admission is not what this is about
    blocker = ticket(RT, 0.0)
    s.admit(blocker, 0.0)
    s.dispatch(0.0)
    tickets = [ticket(UNBOUNDED[name], at) for name, at in items]
    admit_all(s, tickets, 100.0)
    now = 200.0
    s.release(blocker, now)
    while s.queued:
        waiting = list(s.waiting())
        best = max(waiting, key=lambda t: t.policy.head_start_s + (now - t.arrival))
        (t,) = dispatched(s.dispatch(now))
        assert t.policy.head_start_s + (now - t.arrival) == best.policy.head_start_s + (
            now - best.arrival
        )
        s.release(t, now)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(CLASSES.names()), min_size=1, max_size=60),
    st.integers(1, 12),
    st.integers(1, 3),
)
def test_window_bounds_and_conservation(names: list[str], window: int, upstreams: int) -> None:
    """In-flight never exceeds a window; every admitted ticket is dispatched exactly once."""
    s = scheduler(window=window, upstreams=upstreams)
    tickets = [ticket(CLASSES[n], float(i)) for i, n in enumerate(names)]
    admit_all(s, tickets, 0.0)
    seen: list[Ticket] = []
    now = 100.0
    while s.queued or any(w.inflight for w in s.windows.values()):
        out = dispatched(s.dispatch(now))
        assert all(w.inflight <= w.size for w in s.windows.values())
        seen.extend(out)
        for t in out[:1] or [x for x in tickets if x.state is State.DISPATCHED][:1]:
            s.release(t, now)
        now += 1.0
    assert sorted(id(t) for t in seen) == sorted(id(t) for t in tickets)
    assert all(t.state is State.DONE for t in tickets)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CLASSES.names()), st.integers(min_value=1, max_value=8))
def test_wait_bound_under_realtime_saturation(name: str, window: int) -> None:
    """Realtime arrives twice as fast as it is served and keeps the window full; a request of
    any class still gets dispatched within its head-start gap to realtime plus the realtime
    queue deadline (what was already queued ahead of it when it aged to the top)."""
    s = scheduler(window=window)
    realtime_queue_s = 2.0
    created: list[Ticket] = []

    def arrive(t: Ticket, now: float) -> None:
        created.append(t)
        s.admit(t, now)

    now = 0.0
    for _ in range(window):
        arrive(ticket(RT, now, queue_s=realtime_queue_s), now)
    s.dispatch(now)
    victim = ticket(CLASSES[name], now)
    arrive(victim, now)
    bound = CLASSES.top_head_start_s - CLASSES[name].head_start_s + realtime_queue_s + 0.25
    while victim.state is State.QUEUED:
        assert now <= bound, f"{name} waited {now} s, over its bound {bound} s"
        now += 0.25
        arrive(ticket(RT, now, queue_s=realtime_queue_s), now)
        arrive(ticket(RT, now, queue_s=realtime_queue_s), now)
        oldest_running = next(t for t in created if t.state is State.DISPATCHED)
        s.release(oldest_running, now)
        s.dispatch(now)
    assert victim.state is State.DISPATCHED


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(CLASSES.names()), min_size=1, max_size=30),
    st.sampled_from(CLASSES.names()),
    st.integers(min_value=1, max_value=10),
)
def test_shedding_only_evicts_less_important_and_keeps_the_bound(
    queued: list[str], arriving: str, bound: int
) -> None:
    s = scheduler(window=1, max_queued=bound)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    for i, name in enumerate(queued):
        s.admit(ticket(CLASSES[name], float(i)), float(i))
    assert s.queued <= bound
    before = list(s.waiting())
    result = s.admit(ticket(CLASSES[arriving], 50.0), 50.0)
    assert s.queued <= bound
    if isinstance(result, Admitted) and result.shed:
        (victim,) = result.shed
        assert victim.policy.rank > CLASSES[arriving].rank
        lowest = max(t.policy.rank for t in before)
        assert victim.policy.rank == lowest
        assert victim is max((t for t in before if t.policy.rank == lowest), key=lambda t: t.seq)
    if isinstance(result, Rejected) and result.reason == "queue_full":
        assert all(t.policy.rank <= CLASSES[arriving].rank for t in before)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 50), st.floats(0.1, 30)), min_size=1, max_size=30),
    st.floats(0, 100),
)
def test_expiry_removes_exactly_the_tickets_whose_deadline_passed(
    items: list[tuple[float, float]], now: float
) -> None:
    s = scheduler(window=1)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    tickets = [ticket(STD, at, queue_s=q) for at, q in items]
    admit_all(s, tickets, 0.0)
    expired = {id(e.ticket) for e in s.expire(now)}
    assert expired == {id(t) for t in tickets if t.queue_deadline <= now}
    assert s.queued == len(tickets) - len(expired)


# -- fairness between tenants within a class ------------------------------------------------


def test_one_tenants_flood_does_not_starve_another_in_the_same_class() -> None:
    s = scheduler(window=1)
    blocker = ticket(RT, 0.0)
    s.admit(blocker, 0.0)
    s.dispatch(0.0)
    flood = [ticket(BATCH, 1.0 + i / 100, tenant="flooder") for i in range(20)]
    admit_all(s, flood, 1.0)
    polite = [ticket(BATCH, 2.0 + i, tenant="polite") for i in range(3)]
    admit_all(s, polite, 5.0)
    order = []
    running = blocker
    for step in range(8):
        s.release(running, 10.0 + step)
        (running,) = dispatched(s.dispatch(10.0 + step))
        order.append(running.tenant)
    assert order[:6] == ["flooder", "polite"] * 3
    assert order[6:] == ["flooder", "flooder"]


def test_shedding_takes_from_the_heaviest_tenant() -> None:
    s = scheduler(window=1, max_queued=4)
    s.admit(ticket(RT, 0.0), 0.0)
    s.dispatch(0.0)
    heavy = [ticket(BG, 1.0 + i, tenant="heavy") for i in range(3)]
    light = ticket(BG, 9.0, tenant="light")  # the newest overall, but its tenant has one
    admit_all(s, [*heavy, light], 9.0)
    result = s.admit(ticket(RT, 10.0), 10.0)
    assert isinstance(result, Admitted)
    assert result.shed == (heavy[-1],)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=40))
def test_every_waiting_tenant_is_served_within_one_round(tenants: list[str]) -> None:
    """Between two dispatches of a waiting tenant, each other tenant gets at most one."""
    s = scheduler(window=1)
    running = ticket(RT, 0.0)
    s.admit(running, 0.0)
    s.dispatch(0.0)
    admit_all(s, [ticket(STD, 1.0 + i, tenant=t) for i, t in enumerate(tenants)], 50.0)
    order = []
    now = 100.0
    while s.queued:
        s.release(running, now)
        (running,) = dispatched(s.dispatch(now))
        order.append(running.tenant)
        now += 1
    for tenant in set(order):
        positions = [i for i, t in enumerate(order) if t == tenant]
        for a, b in itertools.pairwise(positions):
            between = order[a + 1 : b]
            assert all(between.count(other) <= 1 for other in set(between)), order


def behind_realtime(s: Scheduler) -> tuple[Ticket, Ticket]:
    """Window 1 held by realtime, a batch request queued at 0 and a realtime one waiting.

    Returns the running realtime request and the queued batch one."""
    blocker = ticket(RT, 0.0)
    s.admit(blocker, 0.0)
    s.dispatch(0.0)
    old_batch = ticket(BATCH, 0.0)
    admit_all(s, [old_batch, ticket(RT, 0.0)], 0.0)
    s.dispatch(0.0)  # realtime is left waiting: the class above batch had to wait
    return blocker, old_batch


def test_a_class_fallen_behind_more_important_work_admits_no_more() -> None:
    s = scheduler(window=1)
    _, old_batch = behind_realtime(s)
    late = BATCH.max_wait_s + 1.0
    result = s.admit(ticket(BATCH, late), late)
    assert isinstance(result, Rejected)
    assert result.reason == "class_overloaded"
    assert f"waited {late:.0f} s" in result.message
    assert result.retry_after_s >= 1
    assert isinstance(s.admit(ticket(RT, late), late), Admitted)  # the classes above still enter
    assert old_batch.state is State.QUEUED  # what was admitted stays, to be served by aging


def test_a_paused_request_waiting_again_does_not_close_its_classs_door() -> None:
    """The oldest batch request was served and paused (it waits again at its old place):
    the class got service, so it is not behind; a new batch request is admitted. Without
    this, every preemption of an old batch request refused the class at the door (seen in
    the SLO benchmark: two batch requests refused at 1.5x that vLLM alone served in time)."""
    s = scheduler(window=1)
    _, old_batch = behind_realtime(s)
    old_batch.preemptions = 1  # as after a pause and a requeue
    late = BATCH.max_wait_s + 1.0
    assert isinstance(s.admit(ticket(BATCH, late), late), Admitted)
    fresh = ticket(BATCH, late)
    assert isinstance(s.admit(fresh, late), Admitted)
    later = late + BATCH.max_wait_s + 1.0  # a batch request that never ran is now behind
    result = s.admit(ticket(BATCH, later), later)
    assert isinstance(result, Rejected)
    assert result.reason == "class_overloaded"


def test_a_class_within_its_max_wait_is_admitted() -> None:
    s = scheduler(window=1)
    behind_realtime(s)
    now = BATCH.max_wait_s - 0.5
    assert isinstance(s.admit(ticket(BATCH, now), now), Admitted)


def test_a_class_behind_only_its_own_kind_is_admitted() -> None:
    """A batch flood with nothing more important waiting queues as usual."""
    s = scheduler(window=1)
    admit_all(s, [ticket(BATCH, 0.0) for _ in range(5)], 0.0)
    s.dispatch(0.0)
    assert isinstance(s.admit(ticket(BATCH, 100.0), 100.0), Admitted)


def test_contention_long_past_does_not_close_the_door() -> None:
    s = scheduler(window=1)
    blocker, old_batch = behind_realtime(s)
    s.release(blocker, 1.0)
    s.dispatch(1.0)  # the waiting realtime request runs; from now on only batch waits
    late = 1.0 + BATCH.max_wait_s + 1.0
    assert old_batch.state is State.QUEUED  # batch has waited past its limit...
    assert isinstance(s.admit(ticket(BATCH, late), late), Admitted)  # ...but behind nobody


def test_a_ticket_that_leaves_the_queue_leaves_the_expiry_timers_too() -> None:
    """Dispatched, withdrawn or shed tickets must not wait in the expiry heap until their
    queue deadline (600 s for batch): memory would grow with rate x deadline."""
    s = scheduler(window=1000, max_queued=4)
    tickets = [ticket(BATCH, arrival=0.0, queue_s=600.0) for _ in range(100)]
    for t in tickets:
        s.admit(t, 0.0)
        s.dispatch(0.0)
        s.release(t, 0.1)
    assert s.timer_entries == 0
    queued = [ticket(BATCH, arrival=1.0, queue_s=600.0) for _ in range(3)]
    s.windows["u0"].usable = False
    admit_all(s, queued, 1.0)
    s.withdraw(queued[0])
    assert s.timer_entries <= 2 * s.queued
    assert s.next_expiry() == 601.0


# -- preemption (the SLA engine) ----------------------------------------------------------


def preempted(items: list[Dispatch | Expiry | Preempt]) -> list[Ticket]:
    return [i.ticket for i in items if isinstance(i, Preempt)]


def running_batch(s: Scheduler, n: int, start: float = 0.0) -> list[Ticket]:
    tickets = []
    for i in range(n):
        t = ticket(BATCH, arrival=start + i, preemptible=True)
        s.admit(t, start + i)
        assert dispatched(s.dispatch(start + i)) == [t]
        tickets.append(t)
    return tickets


#: How much later than at the old head starts (realtime 40, batch 10) a batch request ages
#: past fresh realtime work: the times below were written for a 30 s gap.
LATER = RT.head_start_s - BATCH.head_start_s - 30.0


def aged_batch() -> tuple[Scheduler, Ticket]:
    """A one-slot scheduler running a pausable batch request dispatched 5 s after it aged
    past fresh realtime work (35 s at a 30 s gap), having waited since 0 (its upstream was
    unusable)."""
    s = scheduler(window=1, classes=UNBOUNDED)
    b = ticket(BATCH, arrival=0.0, preemptible=True)
    s.admit(b, 0.0)
    s.windows["u0"].usable = False
    s.dispatch(0.0)
    s.windows["u0"].usable = True
    assert dispatched(s.dispatch(35.0 + LATER)) == [b]
    return s, b


def test_a_pausable_class_uses_its_reserve_and_gives_it_back_on_demand() -> None:
    """Work conserving: batch may fill the window; realtime takes a slot back by preemption,
    from the most recently started batch request, one at a time."""
    s = scheduler(window=4)
    _a, _b, c, d = running_batch(s, 4)  # batch's reserve (0.3 of 4) would keep 2 slots free
    rt1, rt2 = ticket(RT, 10.0), ticket(RT, 10.0)
    admit_all(s, [rt1, rt2], 10.0)
    out = s.dispatch(10.0)
    assert dispatched(out) == []
    assert preempted(out) == [d]  # the newest batch request
    assert preempted(s.dispatch(10.1)) == []  # one pause at a time
    s.release(d, 10.2)
    out = s.dispatch(10.2)
    assert dispatched(out) == [rt1]
    assert preempted(out) == [c]
    assert d.preemptions == 1
    s.requeue(d, 10.2)
    s.release(c, 10.3)
    assert dispatched(s.dispatch(10.3)) == [rt2]  # realtime first; d waits at its old place
    s.release(rt1, 11.0)
    assert dispatched(s.dispatch(11.0)) == [d]  # d (arrived at 3) before c is requeued
    assert s.completions.per_second(11.0) is not None


def test_a_request_is_paused_at_most_its_class_limit() -> None:
    s = scheduler(window=1)
    (b,) = running_batch(s, 1)
    for n in range(BATCH.max_preemptions):
        rt = ticket(RT, 10.0 + n)
        s.admit(rt, 10.0 + n)
        assert preempted(s.dispatch(10.0 + n)) == [b]
        s.release(b, 10.0 + n)
        assert dispatched(s.dispatch(10.0 + n)) == [rt]
        s.requeue(b, 10.0 + n)
        s.release(rt, 10.5 + n)
        assert dispatched(s.dispatch(10.5 + n)) == [b]
    assert not b.reclaimable
    rt = ticket(RT, 20.0)
    s.admit(rt, 20.0)
    assert preempted(s.dispatch(20.0)) == []


def test_a_request_aged_past_the_waiting_one_is_not_paused() -> None:
    """The aging bound holds: a batch request that has waited past a fresh realtime
    request's priority keeps its slot."""
    s, _ = aged_batch()
    now = 35.0 + LATER
    rt = ticket(RT, now)
    s.admit(rt, now)
    assert preempted(s.dispatch(now)) == []


def test_only_pausable_less_important_work_is_taken_back() -> None:
    no_reserves = ClassTable(replace(p, reserve=0.0) for p in DEFAULT_POLICIES)
    s = scheduler(window=2, classes=no_reserves)
    fixed = ticket(no_reserves["batch"], 0.0)  # not preemptible (e.g. a response format)
    chat = ticket(no_reserves["interactive"], 0.0, preemptible=True)  # allows no pauses
    admit_all(s, [fixed, chat], 0.0)
    s.dispatch(0.0)
    assert s.windows["u0"].inflight == 2
    rt = ticket(RT, 1.0)
    s.admit(rt, 1.0)
    assert preempted(s.dispatch(1.0)) == []


def test_a_pause_that_cannot_be_carried_out_is_taken_back() -> None:
    s = scheduler(window=1)
    (b,) = running_batch(s, 1)
    s.admit(ticket(RT, 5.0), 5.0)
    assert preempted(s.dispatch(5.0)) == [b]
    s.keep(b)  # nothing was there to pause it
    assert (b.preempting, b.preemptions) == (False, 0)
    assert preempted(s.dispatch(5.1)) == [b]  # it can be asked again


def test_a_requeued_request_keeps_its_total_deadline_not_its_queue_deadline() -> None:
    s = scheduler(window=1)
    b = ticket(BATCH, 0.0, queue_s=5.0, total_s=100.0, preemptible=True)
    s.admit(b, 0.0)
    s.dispatch(0.0)
    s.admit(ticket(RT, 6.0), 6.0)  # past b's queue deadline, well before its total one
    assert preempted(s.dispatch(6.0)) == [b]
    s.release(b, 6.0)
    s.dispatch(6.0)
    s.requeue(b, 6.0)
    assert s.next_expiry() == 100.0


def test_tickets_that_left_the_queue_leave_the_expiry_heap_while_one_waits() -> None:
    """The queue never empties (one request held back by headroom) while 1,000 batch
    requests pass through: the heap must not keep them (the soak helper's reproducer)."""
    s = scheduler(window=10)
    waiting = ticket(BG, 0.0, queue_s=100.0)
    admit_all(s, [waiting], 0.0)
    running = [ticket(BATCH, 0.0, queue_s=600.0) for _ in range(7)]
    admit_all(s, running, 0.0)
    assert dispatched(s.dispatch(0.0)) == running
    for i in range(1, 1001):
        now = i * 0.005
        admit_all(s, [ticket(BATCH, now, queue_s=600.0)], now)
        s.release(running.pop(0), now)
        running += dispatched(s.dispatch(now))
        assert waiting.state is State.QUEUED
    assert s.queued == 1
    assert s.timer_entries <= 2 * s.queued + 1


def test_a_late_request_waits_behind_one_that_can_still_make_it() -> None:
    """Under overload, first come first served makes every answer late: a chat that waited
    past its time to first token goes behind a fresh one, and is served when a slot frees
    before its queue deadline."""
    s = scheduler(window=1, classes=UNBOUNDED)
    busy = ticket(RT, 0.0)
    s.admit(busy, 0.0)
    s.dispatch(0.0)
    old = ticket(INTER, 0.0, queue_s=10.0, late_at=3.0)
    fresh = ticket(INTER, 4.0, queue_s=10.0, late_at=7.0)
    admit_all(s, [old, fresh], 4.0)
    s.release(busy, 4.5)
    assert dispatched(s.dispatch(4.5)) == [fresh]
    assert old.late
    assert not fresh.late
    s.release(fresh, 6.0)
    assert dispatched(s.dispatch(6.0)) == [old]  # a free slot before its queue deadline


def test_a_late_request_goes_behind_less_important_work_that_is_on_time() -> None:
    s = scheduler(window=1, classes=UNBOUNDED)
    busy = ticket(RT, 0.0)
    s.admit(busy, 0.0)
    s.dispatch(0.0)
    chat = ticket(INTER, 0.0, queue_s=10.0, late_at=3.0)
    batch = ticket(BATCH, 1.0)
    admit_all(s, [chat, batch], 1.0)
    s.release(busy, 4.0)
    assert dispatched(s.dispatch(4.0)) == [batch]


def test_a_late_request_takes_a_free_slot_never_a_running_ones() -> None:
    s = scheduler(window=1, classes=UNBOUNDED)
    (b,) = running_batch(s, 1)
    b.started = True
    late = ticket(INTER, 1.0, queue_s=10.0, late_at=3.0)
    s.admit(late, 1.0)
    assert preempted(s.dispatch(2.0)) == [b]  # on time: takes the slot back
    s.keep(b)
    assert preempted(s.dispatch(3.0)) == []  # late now: waits for a free slot


def test_a_stream_that_cannot_start_in_time_is_refused_when_that_is_certain() -> None:
    """A stream's SLA is its first token: ``refuse_late`` takes it out of the queue as soon as
    less than its observed time to first token is left before ``late_at`` (stage "sla"),
    instead of serving it late, while a whole answer in the same spot waits on."""
    s = scheduler(window=1, classes=UNBOUNDED)
    busy = ticket(RT, 0.0)
    s.admit(busy, 0.0)
    s.dispatch(0.0)
    stream = ticket(INTER, 0.0, queue_s=10.0, late_at=3.0, need_s=0.5, refuse_late=True)
    whole = ticket(INTER, 0.0, queue_s=10.0, late_at=3.0, need_s=0.5)
    admit_all(s, [stream, whole], 0.0)
    assert s.next_expiry() == 2.5
    assert s.expire(2.4) == []
    (expiry,) = s.expire(2.5)
    assert expiry.ticket is stream
    assert expiry.stage == "sla"
    assert stream.state is State.EXPIRED
    assert s.queued == 1
    assert s.next_expiry() == 10.0
    s.release(busy, 5.0)
    assert dispatched(s.dispatch(5.0)) == [whole]


def test_a_queue_deadline_before_the_sla_still_expires_as_a_timeout() -> None:
    t = ticket(INTER, 0.0, queue_s=2.0, late_at=3.0, need_s=0.5, refuse_late=True)
    assert t.expires_at == 2.0
    assert t.expiry_stage == "queue"
    t = ticket(INTER, 0.0, queue_s=10.0, total_s=2.0, late_at=3.0, need_s=0.5, refuse_late=True)
    assert t.expires_at == 1.5
    assert t.expiry_stage == "dispatch"


def test_a_paused_stream_whose_answer_began_is_never_refused_for_its_first_token() -> None:
    s = scheduler(window=1, classes=UNBOUNDED)
    (b,) = running_batch(s, 1)
    b.refuse_late, b.late_at, b.started = True, 3.0, True
    rt = ticket(RT, 1.0)
    s.admit(rt, 1.0)
    assert preempted(s.dispatch(1.0)) == [b]
    s.release(b, 1.1)
    s.requeue(b, 1.1)
    assert b.expires_at == b.deadline  # its first token came: only its total deadline is left
    assert [i for i in s.dispatch(4.0) if isinstance(i, Expiry)] == []


def test_a_paused_request_whose_answer_began_ages_afresh() -> None:
    """A batch request that aged past fresh realtime work starts. Once its answer began it
    can be paused for realtime, and then waits from the pause: a fresh chat goes before it,
    and it is back within its class's gap to the top."""
    s, b = aged_batch()
    t = LATER  # every time below is shifted by it
    rt = ticket(RT, 35.5 + t)
    s.admit(rt, 35.5 + t)
    assert preempted(s.dispatch(35.5 + t)) == []  # its answer has not begun: its wait goes on
    s.keep(b)
    b.started = True
    assert preempted(s.dispatch(36.0 + t)) == [b]
    s.release(b, 36.1 + t)
    assert dispatched(s.dispatch(36.1 + t)) == [rt]
    s.requeue(b, 36.1 + t)
    chat = ticket(INTER, 37.0 + t)
    s.admit(chat, 37.0 + t)
    s.release(rt, 37.5 + t)
    assert dispatched(s.dispatch(37.5 + t)) == [chat]  # b's old, aged place is gone
    s.release(chat, 40.0 + t)
    assert dispatched(s.dispatch(40.0 + t)) == [b]
    assert b.key == 36.1 + t - BATCH.head_start_s


def test_a_paused_request_whose_answer_had_not_begun_keeps_its_place() -> None:
    s = scheduler(window=1, classes=UNBOUNDED)
    (b,) = running_batch(s, 1)
    s.admit(ticket(RT, 5.0), 5.0)
    assert preempted(s.dispatch(5.0)) == [b]
    s.release(b, 5.1)
    s.dispatch(5.1)
    s.requeue(b, 5.1)
    assert b.key == 0.0 - BATCH.head_start_s


def test_a_request_that_aged_past_fresh_work_is_paused_for_it_at_most_once() -> None:
    """Paused each time it came back, an old request would never finish (an integration
    test saw a background request starve): once paused, it is paused again only while it is
    behind the waiting request in the queue's order."""
    s, b = aged_batch()
    t = LATER
    b.started = True
    rt = ticket(RT, 36.0 + t)
    s.admit(rt, 36.0 + t)
    assert preempted(s.dispatch(36.0 + t)) == [b]
    s.release(b, 36.1 + t)
    assert dispatched(s.dispatch(36.1 + t)) == [rt]
    s.requeue(b, 36.1 + t)
    s.release(rt, 37.0 + t)
    s.windows["u0"].usable = False
    s.dispatch(37.0 + t)
    s.windows["u0"].usable = True
    again = 36.1 + t + RT.head_start_s - BATCH.head_start_s + 3.9  # aged past realtime again
    assert dispatched(s.dispatch(again)) == [b]
    s.admit(ticket(RT, again + 0.5), again + 0.5)
    assert preempted(s.dispatch(again + 0.5)) == []


# -- draining windows (gateway.roster) ---------------------------------------------------


def test_a_ticket_paused_on_a_draining_upstream_resumes_elsewhere() -> None:
    s = Scheduler(CLASSES, 512, [Window("old", 1), Window("new", 1, usable=False)])
    t = ticket(BATCH, 0.0, preemptible=True)
    admit_all(s, [t], 0.0)
    assert dispatched(s.dispatch(0.0)) == [t]
    assert t.upstream == "old"
    s.windows["old"].usable = False  # removed from the upstreams file: draining
    s.windows["new"].usable = True
    s.release(t, 1.0)  # paused (its call cut), then queued again as gateway.serving does
    s.requeue(t, 1.0)
    assert dispatched(s.dispatch(1.0)) == [t]
    assert t.upstream == "new"
    assert s.windows["old"].inflight == 0
    s.windows.pop("old")  # drained: forgotten, and releasing the ticket still works
    s.release(t, 2.0)
    assert s.windows["new"].inflight == 0
