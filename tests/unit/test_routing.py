"""Routing among windows with room: rendezvous hashing of the task, the load guard, ties."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.routing import SPILL_MARGIN, Router, hash_order
from gateway.settings import Settings, parse_settings
from gateway.tickets import Window
from tests.fake_vllm import FakeVllm
from tests.servers import running_gateway
from tests.support import metric

NAMES = tuple(f"10.0.0.{i}:8000" for i in range(1, 6))
TASKS = [f"task-{i}" for i in range(200)]
ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "hello"}]


def windows(*sizes_and_loads: tuple[int, int]) -> list[Window]:
    return [Window(f"u{i}", size, inflight=n) for i, (size, n) in enumerate(sizes_and_loads)]


def names(ws: list[Window]) -> tuple[str, ...]:
    return tuple(w.name for w in ws)


def task_with_home(home: str, among: tuple[str, ...]) -> str:
    """A task name whose first choice among ``among`` is ``home`` (found, not hard-coded)."""
    return next(t for t in TASKS if hash_order(t, among)[0] == home)


def test_the_order_is_the_same_on_every_call_and_does_not_depend_on_the_input_order() -> None:
    router = Router()
    first = {t: router.order(t, NAMES) for t in TASKS}
    assert {t: router.order(t, NAMES) for t in TASKS} == first
    assert {t: Router().order(t, tuple(reversed(NAMES))) for t in TASKS} == first
    assert all(sorted(order) == sorted(NAMES) for order in first.values())


def test_the_order_is_the_same_in_other_processes_whatever_their_hash_seed() -> None:
    """Gateways behind one balancer, or one after a restart, must agree on every task's home:
    Python's ``hash()`` of a str differs per process (PYTHONHASHSEED), blake2b does not."""
    code = (
        "import sys; from gateway.routing import hash_order; "
        f"names = {NAMES!r}; "
        "print(';'.join(','.join(hash_order(t, names)) for t in sys.argv[1:]))"
    )
    here = ";".join(",".join(hash_order(t, NAMES)) for t in TASKS[:50])
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, *TASKS[:50]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == here


def test_tasks_spread_over_the_upstreams() -> None:
    homes = [hash_order(t, NAMES)[0] for t in TASKS]
    assert {homes.count(n) for n in NAMES} <= set(range(20, 61))  # 40 each on average


def test_removing_an_upstream_moves_only_the_tasks_whose_home_it_was() -> None:
    gone = NAMES[2]
    rest = tuple(n for n in NAMES if n != gone)
    moved = [t for t in TASKS if hash_order(t, NAMES)[0] != hash_order(t, rest)[0]]
    assert moved == [t for t in TASKS if hash_order(t, NAMES)[0] == gone]
    assert moved  # some were there, and they went to their second choice:
    assert all(hash_order(t, rest)[0] == hash_order(t, NAMES)[1] for t in moved)


def test_adding_an_upstream_moves_only_the_tasks_it_becomes_home_to() -> None:
    grown = (*NAMES, "10.0.0.9:8000")
    for t in TASKS:
        before, after = hash_order(t, NAMES)[0], hash_order(t, grown)[0]
        assert after in (before, "10.0.0.9:8000")


def test_a_task_goes_home_while_the_load_is_even() -> None:
    ws = windows((4, 0), (4, 0), (4, 0))
    router = Router()
    for home in names(ws):
        task = task_with_home(home, names(ws))
        assert router.choose(task, ws, names(ws)) is ws[int(home[1:])]


def test_home_busier_by_the_margin_exactly_still_gets_it() -> None:
    ws = windows((4, 1), (4, 0))  # 1/4 busier: the margin itself
    task = task_with_home("u0", names(ws))
    assert Router().choose(task, ws, names(ws)) is ws[0]


def test_home_busier_by_more_than_the_margin_spills_to_the_next_in_hash_order() -> None:
    ws = windows((8, 6), (8, 3), (8, 2))  # home 0.75; least 0.25; u1 0.375 is within margin
    three = names(ws)
    task = next(t for t in TASKS if hash_order(t, three)[:2] == ("u0", "u1"))
    assert Router().choose(task, ws, three) is ws[1]
    ws[1].inflight = 5  # 0.625: now too busy as well, so the least loaded
    assert Router().choose(task, ws, three) is ws[2]


def test_the_margin_is_a_ratio_so_it_holds_across_window_sizes() -> None:
    ws = [Window("gpu", 64, inflight=30), Window("cpu", 4, inflight=1)]  # 0.47 vs 0.25
    task = task_with_home("gpu", names(ws))
    assert Router().choose(task, ws, names(ws)) is ws[0]
    ws[0].inflight = 33  # 0.52: more than a quarter over
    assert Router().choose(task, ws, names(ws)) is ws[1]


def test_a_zero_margin_spills_at_any_imbalance() -> None:
    ws = windows((4, 1), (4, 0))
    task = task_with_home("u0", names(ws))
    assert Router(margin=0.0).choose(task, ws, names(ws)) is ws[1]
    assert Router(margin=SPILL_MARGIN).choose(task, ws, names(ws)) is ws[0]


def test_least_loaded_takes_the_first_of_equals_in_the_given_order() -> None:
    ws = windows((4, 2), (4, 1), (4, 1))
    router = Router("least-loaded")
    for task in TASKS[:20]:
        assert router.choose(task, ws, names(ws)) is ws[1]


def test_only_windows_with_room_are_offered_and_none_means_none() -> None:
    ws = windows((4, 0), (4, 0))
    task = task_with_home("u0", names(ws))
    assert Router().choose(task, ws[1:], names(ws)) is ws[1]  # home full: the other one
    assert Router().choose(task, [], names(ws)) is None


def test_a_new_set_of_names_drops_the_cached_orders() -> None:
    router = Router()
    task = task_with_home("u0", ("u0", "u1"))
    assert router.order(task, ("u0", "u1"))[0] == "u0"
    assert router.order(task, ("u1", "u2")) == hash_order(task, ("u1", "u2"))


@pytest.mark.parametrize(
    ("mode", "margin"), [("round-robin", SPILL_MARGIN), ("affinity", -0.1), ("affinity", 1.5)]
)
def test_bad_parameters_are_refused_with_a_clear_message(mode: str, margin: float) -> None:
    with pytest.raises(ValueError, match=r"routing must be|spill margin"):
        Router(mode, margin)  # type: ignore[arg-type]


# -- the setting ------------------------------------------------------------------------------


def test_routing_is_affinity_by_default_and_set_by_flag_or_environment() -> None:
    assert parse_settings([], env={}).routing == "affinity"
    assert parse_settings([], env={"GATEWAY_ROUTING": "least-loaded"}).routing == "least-loaded"
    flag = parse_settings(["--routing", "Affinity"], env={"GATEWAY_ROUTING": "least-loaded"})
    assert flag.routing == "affinity"


def test_an_unknown_routing_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--routing", "random"], env={})
    assert exit_.value.code == 2
    assert "--routing must be one of affinity, least-loaded" in capsys.readouterr().err


# -- through a gateway, two fake upstreams ---------------------------------------------------


@pytest.fixture
async def other() -> AsyncIterator[FakeVllm]:
    upstream = FakeVllm()
    await upstream.start()
    yield upstream
    await upstream.stop()


async def test_one_tasks_requests_land_on_one_upstream(fake: FakeVllm, other: FakeVllm) -> None:
    """Each task's requests (one at a time: the load stays even) all reach its home. The
    upstreams are listed with chat's home second, where least-loaded would never send it."""
    by_name = {u.url.split("://", 1)[1]: u for u in (fake, other)}
    chat_home = by_name[hash_order("chat", tuple(by_name))[0]]
    first = other if chat_home is fake else fake
    settings = Settings(
        upstreams=(first.url, chat_home.url),
        window=4,
        window_mode="fixed",
        health_interval_s=0.2,
        access_log=False,
    )
    async with running_gateway(settings) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        async with asyncio.timeout(10):  # both health-checked before the first request
            for name in by_name:
                while await metric(c, f'gateway_upstream_up{{upstream="{name}"}}') != 1:
                    await asyncio.sleep(0.02)
        for task in ("chat", "code"):
            before = {u.url: len(u.seen) for u in by_name.values()}
            for _ in range(5):
                r = await c.post("/v1/chat/completions", json={"model": task, "messages": USER})
                assert r.status_code == 200, r.text
            home = by_name[hash_order(task, tuple(by_name))[0]]
            assert {u.url: len(u.seen) - before[u.url] for u in by_name.values()} == {
                u.url: 5 if u is home else 0 for u in by_name.values()
            }
