"""Token-weighted fairness between tenants (VTC): the ledger, the meter, and the shares the
scheduler gives backlogged tenants, simulated with an explicit clock (no sleeps)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.classes import DEFAULT_POLICIES, ClassTable
from gateway.fairness import FLUSH_EVENTS, FairnessPolicy, Ledger, Meter, estimate_prompt_tokens
from gateway.scheduler import Dispatch, Scheduler, State, Ticket, Window

CLASSES = ClassTable(DEFAULT_POLICIES)
RT, BATCH, BG = CLASSES["realtime"], CLASSES["batch"], CLASSES["background"]
TOKENS = FairnessPolicy()
REQUESTS = FairnessPolicy(mode="requests")


def charge(
    ledger: Ledger, tenant: str, tokens: float, now: float = 0.0, weight: float = 1.0
) -> None:
    ledger.charge(tenant, TOKENS, tokens, 0.0, 0, weight, now)


# -- the ledger ------------------------------------------------------------------------------


def test_a_tenant_becoming_active_is_lifted_to_the_least_active_counter() -> None:
    ledger = Ledger()
    for tenant in ("a", "b"):
        ledger.join(tenant, returning=False)
    charge(ledger, "a", 500)
    charge(ledger, "b", 300)
    ledger.join("c", returning=False)
    assert ledger.counter("c") == 300  # b's: the least among the active, not a's


def test_a_tenant_above_the_floor_keeps_its_debt() -> None:
    ledger = Ledger()
    ledger.join("a", returning=False)
    ledger.join("b", returning=False)
    charge(ledger, "a", 900)
    charge(ledger, "b", 100)
    ledger.leave("a")
    ledger.join("a", returning=False)  # back at once: it was served more than b
    assert ledger.counter("a") == 900


def test_a_class_that_empties_remembers_where_its_last_tenant_left_off() -> None:
    """b left early; a ran alone to 5,000. b must not come back at its old 1,000 and bank
    the time a ran alone."""
    ledger = Ledger()
    ledger.join("a", returning=False)
    ledger.join("b", returning=False)
    charge(ledger, "a", 1000)
    charge(ledger, "b", 1000)
    ledger.leave("b")
    charge(ledger, "a", 4000)
    ledger.leave("a")
    ledger.join("b", returning=False)
    assert ledger.counter("b") == 5000


def test_a_returning_ticket_keeps_its_tenants_counter() -> None:
    """Paused and requeued (or failing over): its tenant was active all along."""
    ledger = Ledger()
    ledger.join("a", returning=False)
    ledger.join("b", returning=False)
    charge(ledger, "a", 1000)
    ledger.leave("b")
    ledger.join("b", returning=True)
    assert ledger.counter("b") == 0


def test_counters_are_kept_only_for_active_tenants_and_those_above_the_floor() -> None:
    ledger = Ledger()
    for i in range(100):
        tenant = f"t{i}"
        ledger.join(tenant, returning=False)
        charge(ledger, tenant, 10)
        ledger.leave(tenant)
    assert ledger.tenants() <= 1


def test_the_anonymous_tenant_is_not_counted() -> None:
    """Without keys there is one tenant: nothing to share, nothing kept."""
    ledger = Ledger()
    ledger.join("", returning=False)
    charge(ledger, "", 100)
    ledger.waiting([""], 0.0)
    assert ledger.tenants() == 0
    assert not ledger.served
    assert ledger.shares(0.0) == {}


def test_weights_divide_the_counter() -> None:
    ledger = Ledger()
    ledger.join("gold", returning=False)
    charge(ledger, "gold", 200, weight=2.0)
    assert ledger.counter("gold") == 100
    assert ledger.served["gold"] == 200  # what it was served stays in tokens


def test_requests_mode_counts_requests_and_still_serves_tokens() -> None:
    ledger = Ledger()
    ledger.charge("a", REQUESTS, 40, 0, 1, 1.0, 0.0)  # a dispatch
    ledger.charge("a", REQUESTS, 0, 100, 0, 1.0, 0.0)  # tokens streaming
    assert ledger.counter("a") == 1
    assert ledger.served["a"] == 40 + 2 * 100


def test_jain_index_and_shares_over_the_window() -> None:
    ledger = Ledger()
    ledger.waiting(["a", "b"], 0.0)
    charge(ledger, "a", 300, now=1.0)
    charge(ledger, "b", 100, now=2.0)
    assert ledger.shares(2.0) == {"a": 0.75, "b": 0.25}
    assert ledger.fairness_index(2.0) == pytest.approx(400**2 / (2 * (300**2 + 100**2)))
    charge(ledger, "b", 200, now=3.0)
    assert ledger.fairness_index(3.0) == pytest.approx(1.0)
    assert ledger.shares(200.0) == {}  # forgotten
    assert ledger.fairness_index(200.0) == 1.0


def test_jain_index_is_by_weight_and_counts_a_starved_tenant() -> None:
    ledger = Ledger()
    ledger.waiting(["gold", "plain"], 0.0)
    charge(ledger, "gold", 200, weight=2.0)
    charge(ledger, "plain", 100)
    assert ledger.fairness_index(0.0) == pytest.approx(1.0)
    ledger.waiting(["starved"], 0.0)  # wanted service, got none
    assert ledger.fairness_index(0.0) == pytest.approx(200**2 / (3 * 2 * 100**2))


# -- the meter -------------------------------------------------------------------------------


def event(text: str) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"' + text.encode() + b'"}}]}\n\n'


def test_the_meter_charges_every_few_events_and_settles_exactly_at_the_end() -> None:
    charged: list[tuple[float, float]] = []
    meter = Meter(lambda p, o: charged.append((p, o)), prompt_charged=10)
    meter.batch(event("x") * (FLUSH_EVENTS - 1))
    assert charged == []  # cheap: a byte count, no charge yet
    meter.batch(event("y"))
    assert charged == [(0.0, FLUSH_EVENTS)]
    meter.batch(event("z") * 3)
    meter.settle(prompt_tokens=25, output_tokens=FLUSH_EVENTS + 5)
    assert charged[1:] == [(15.0, 5.0)]  # the prompt beyond its estimate, the tokens left
    assert sum(o for _, o in charged) == FLUSH_EVENTS + 5


def test_the_meter_never_takes_back_and_keeps_its_events_without_usage() -> None:
    charged: list[tuple[float, float]] = []
    meter = Meter(lambda p, o: charged.append((p, o)), prompt_charged=50)
    meter.batch(event("x") * 3)
    meter.settle(prompt_tokens=None, output_tokens=None)  # no usage: the count is it
    assert charged == [(0.0, 3.0)]
    meter.settle(prompt_tokens=20, output_tokens=2)  # under the estimates: nothing back
    assert charged == [(0.0, 3.0)]


def test_the_last_batch_is_left_to_the_exact_count() -> None:
    """Its finish, usage and [DONE] events are no tokens: counting them would overcharge a
    short answer, and a charge is never taken back."""
    charged: list[tuple[float, float]] = []
    meter = Meter(lambda p, o: charged.append((p, o)), prompt_charged=5)
    meter.batch(event("x") * (FLUSH_EVENTS - 2))
    meter.batch(event("y") + b'data: {"choices":[],"usage":{}}\n\n' * 8 + b"data: [DONE]\n\n")
    assert charged == []
    meter.settle(prompt_tokens=5, output_tokens=FLUSH_EVENTS - 1)
    assert charged == [(0.0, FLUSH_EVENTS - 1)]


def test_a_later_steps_meter_counts_only_its_own_usage() -> None:
    charged: list[tuple[float, float]] = []
    meter = Meter(lambda p, o: charged.append((p, o)), prompt_charged=5, before=(30, 1))
    meter.settle(prompt_tokens=30 + 8, output_tokens=1 + 40)
    assert charged == [(3.0, 40.0)]


def test_the_prompt_estimate_is_low() -> None:
    assert estimate_prompt_tokens("hello world, how are you today?") <= 8
    assert estimate_prompt_tokens("这家餐厅太好吃了") <= 8  # 8 characters, 24 bytes


# -- shares under contention, simulated ------------------------------------------------------


@dataclass
class Tenant:
    name: str
    prompt: int
    output: int
    backlog: int = 8  # requests it keeps queued: always backlogged
    resend: bool = True  # a finished request is followed by another
    running: dict[Ticket, int] = field(default_factory=dict)


class Sim:
    """A window of slots; each running request generates one token per tick and is charged
    for it at once, as the meter would; a finished request's tenant sends another."""

    def __init__(self, s: Scheduler) -> None:
        self.s, self.now = s, 0.0
        self.tenants: dict[str, Tenant] = {}
        self.seq = itertools.count()

    def add(self, tenant: Tenant) -> None:
        self.tenants[tenant.name] = tenant
        for _ in range(tenant.backlog):
            self.send(tenant)

    def send(self, tenant: Tenant) -> Ticket:
        t = Ticket(
            task="batch",
            policy=BATCH,
            arrival=self.now + next(self.seq) * 1e-6,
            queue_deadline=1e12,
            deadline=1e12,
            tenant=tenant.name,
            prompt_tokens=tenant.prompt,
            output_tokens=tenant.output,  # its max_tokens: on random weights, what it gets
        )
        self.s.admit(t, self.now)
        return t

    def dispatch(self) -> list[Ticket]:
        out = [i.ticket for i in self.s.dispatch(self.now) if isinstance(i, Dispatch)]
        for t in out:
            tenant = self.tenants[t.tenant]
            tenant.running[t] = tenant.output
        return out

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.dispatch()
            self.now += 1.0
            for tenant in self.tenants.values():
                for t in list(tenant.running):
                    self.s.charge(t, 0, 1, self.now)
                    tenant.running[t] -= 1
                    if tenant.running[t] == 0:
                        del tenant.running[t]
                        self.s.release(t, self.now)
                        if tenant.resend:
                            self.send(tenant)

    def served(self, ticks: int, warmup: int = 2000) -> dict[str, float]:
        """Each tenant's service in weighted tokens over ``ticks``, after a warm-up."""
        self.run(warmup)
        before = dict(self.s.ledgers()["batch"].served)
        self.run(ticks)
        after = self.s.ledgers()["batch"].served
        return {n: after[n] - before.get(n, 0.0) for n in self.tenants}


def sim(window: int = 4, policy: FairnessPolicy = TOKENS, **weights: float) -> Sim:
    return Sim(Scheduler(CLASSES, 4096, [Window("u", window)], policy, weights))


def within(served: dict[str, float], shares: dict[str, float], tolerance: float = 0.1) -> bool:
    total = sum(served.values())
    return all(abs(served[n] / (total * shares[n]) - 1) <= tolerance for n in served)


@pytest.mark.parametrize("window", [1, 4, 8])
def test_two_backlogged_tenants_with_1_to_10_sizes_get_equal_token_service(window: int) -> None:
    world = sim(window)
    world.add(Tenant("short", prompt=5, output=20))
    world.add(Tenant("long", prompt=50, output=200))
    served = world.served(20_000)
    assert within(served, {"short": 0.5, "long": 0.5}), served


def test_three_backlogged_tenants_get_equal_token_service() -> None:
    world = sim(4)
    world.add(Tenant("short", prompt=5, output=20))
    world.add(Tenant("medium", prompt=10, output=80))
    world.add(Tenant("long", prompt=50, output=200))
    served = world.served(30_000)
    assert within(served, {"short": 1 / 3, "medium": 1 / 3, "long": 1 / 3}), served


def test_weighted_tenants_get_weighted_token_service() -> None:
    world = sim(4, gold=2.0, long=1.0)
    world.add(Tenant("gold", prompt=5, output=20))
    world.add(Tenant("long", prompt=50, output=200))
    world.add(Tenant("plain", prompt=10, output=100))
    served = world.served(30_000)
    assert within(served, {"gold": 0.5, "long": 0.25, "plain": 0.25}), served


def test_request_round_robin_gives_the_short_tenant_a_small_fraction() -> None:
    """What ``mode = "requests"`` does, and why tokens are the default."""
    world = sim(4, REQUESTS)
    world.add(Tenant("short", prompt=5, output=20))
    world.add(Tenant("long", prompt=50, output=200))
    served = world.served(20_000)
    assert served["short"] / served["long"] < 0.15, served


def test_a_tenant_back_from_idle_gets_no_burst_beyond_the_lift() -> None:
    """c was served early on with a and b, went idle while they kept the class busy, and
    comes back with a backlog: from its lift on it gets its third of the slots, not all."""
    world = sim(1)
    c = Tenant("c", prompt=10, output=100, backlog=3, resend=False)
    world.add(Tenant("a", prompt=10, output=10))
    world.add(Tenant("b", prompt=10, output=10))
    world.add(c)
    world.run(5_000)
    assert not c.running
    ledger = world.s.ledgers()["batch"]
    assert ledger.tenants() == 3  # c left above the floor: its own counter is kept...
    assert ledger.counter("c") < min(ledger.counter("a"), ledger.counter("b")) - 1000  # ...low
    c.resend = True
    for _ in range(8):
        world.send(c)
    order: list[str] = []
    while len(order) < 30:
        order.extend(t.tenant for t in world.dispatch())
        world.run(1)
    assert order.count("c") <= 30 / 3 + 1, order
    assert "c" in order[:3]  # and it is not made to wait either: it starts as an equal


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 5_000), st.integers(1, 8))
def test_the_aging_bound_holds_for_a_class_whatever_its_tenants_counters(
    debt: int, window: int
) -> None:
    """Realtime saturates the window. Batch tenant ``old`` has a request waiting since 0 and
    a large debt; tenant ``new`` keeps sending fresh ones and is owed service. The class
    still gets a slot within its head-start gap to realtime plus realtime's queue deadline
    (the class competes by its oldest request; fairness only picks whose request runs)."""
    s = Scheduler(CLASSES, 4096, [Window("u", window)])
    realtime: list[Ticket] = []

    def arrive(t: Ticket, now: float) -> None:
        s.admit(t, now)
        if t.policy is RT:
            realtime.append(t)

    now = 0.0
    for _ in range(window):
        arrive(Ticket("rt", RT, now, now + 2.0, now + 10.0), now)
    s.dispatch(now)
    old = Ticket("batch", BATCH, now, 1e9, 1e9, tenant="old")
    arrive(old, now)
    bound = CLASSES.top_head_start_s - BATCH.head_start_s + 2.0 + 0.25
    batch: list[Ticket] = []
    while not batch:
        assert now <= bound, f"batch waited {now} s, over its bound {bound} s"
        now += 0.25
        for _ in range(2):
            arrive(Ticket("rt", RT, now, now + 2.0, now + 10.0), now)
        if now >= 5.0:  # new's requests: from 5 s on, newer than old's by that much
            arrive(Ticket("batch", BATCH, now, 1e9, 1e9, tenant="new"), now)
        if now == 5.0:
            s.charge(old, debt, 0, now)  # old was served more before: new is owed service
        s.release(next(t for t in realtime if t.state is State.DISPATCHED), now)
        batch = [
            i.ticket
            for i in s.dispatch(now)
            if isinstance(i, Dispatch) and i.ticket.policy is BATCH
        ]


def test_a_long_generation_just_started_counts_against_its_tenant() -> None:
    """A free window is not all taken by one tenant's long requests before its counter could
    show them: what a running request may generate is reserved against its tenant."""
    s = Scheduler(CLASSES, 64, [Window("u", 4)])
    for i in range(4):
        for name, output in (("long", 320), ("short", 16)):
            t = Ticket("b", BATCH, i, 1e9, 1e9, tenant=name, output_tokens=output, preemptible=True)
            s.admit(t, 0.0)
    started = [i.ticket for i in s.dispatch(0.0) if isinstance(i, Dispatch)]
    assert [t.tenant for t in started] == ["long", "short", "short", "short"]


def test_a_reservation_becomes_service_and_the_rest_is_let_go() -> None:
    s = Scheduler(CLASSES, 64, [Window("u", 4)])
    t = Ticket("b", BATCH, 0.0, 1e9, 1e9, tenant="a", prompt_tokens=10, output_tokens=100)
    s.admit(t, 0.0)
    s.dispatch(0.0)
    ledger = s.ledgers()["batch"]
    assert ledger.counter("a") == 10 + 2 * 100
    s.charge(t, 0, 30, 1.0)
    assert ledger.counter("a") == 10 + 2 * 100  # 30 tokens moved from reserved to served
    s.release(t, 2.0)  # it stopped at 30
    assert ledger.counter("a") == 10 + 2 * 30
    assert ledger.served["a"] == 10 + 2 * 30


def test_shedding_takes_from_the_tenant_furthest_above_its_share() -> None:
    s = Scheduler(CLASSES, 4, [Window("u", 1)])
    s.admit(Ticket("rt", RT, 0.0, 1e9, 1e9), 0.0)
    s.dispatch(0.0)
    light = [Ticket("bg", BG, 1.0 + i, 1e9, 1e9, tenant="light") for i in range(3)]
    heavy = Ticket("bg", BG, 0.5, 1e9, 1e9, tenant="heavy")  # one waiting, the oldest
    for t in [heavy, *light]:
        s.admit(t, 5.0)
    s.charge(heavy, 0, 1_000, 5.0)  # e.g. its earlier long generations
    result = s.admit(Ticket("rt", RT, 10.0, 1e9, 1e9), 10.0)
    assert result.shed == (heavy,)  # type: ignore[union-attr]


def test_shedding_weighs_the_share_by_weight() -> None:
    s = Scheduler(CLASSES, 2, [Window("u", 1)], weights={"gold": 4.0})
    s.admit(Ticket("rt", RT, 0.0, 1e9, 1e9), 0.0)
    s.dispatch(0.0)
    gold = Ticket("bg", BG, 1.0, 1e9, 1e9, tenant="gold")
    plain = Ticket("bg", BG, 2.0, 1e9, 1e9, tenant="plain")
    for t in (gold, plain):
        s.admit(t, 5.0)
    s.charge(gold, 0, 300, 5.0)  # 600 tokens of service over 4 shares: 150
    s.charge(plain, 0, 100, 5.0)  # 200 over 1: 200, further above its share
    result = s.admit(Ticket("rt", RT, 10.0, 1e9, 1e9), 10.0)
    assert result.shed == (plain,)  # type: ignore[union-attr]
