"""An upstream added, drained, re-added and forgotten in every part that knows of it: the
health checks, the scheduler's window, its sizing, the scraper, the metric series and the
status page. The real runtime parts, in front of the in-process fake vLLM, with the roster
driven by hand (no background loops, so no sleeps)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.auth import load_keyring
from gateway.config import load_config
from gateway.runtime import Runtime, build_runtime, close_runtime
from gateway.scheduler import Dispatch, Ticket
from gateway.settings import Settings
from gateway.upstreams import upstream_name
from gateway.upstreams_file import load_upstreams_file
from tests.fake_vllm import FakeVllm


@pytest.fixture
async def other() -> AsyncIterator[FakeVllm]:
    upstream = FakeVllm()
    await upstream.start()
    yield upstream
    await upstream.stop()


def listing(path: Path, *urls: str, overflow: str | None = None) -> None:
    entries = [f'[[upstream]]\nurl = "{u}"\n' for u in urls]
    if overflow is not None:
        entries.append(f'[[upstream]]\nurl = "{overflow}"\noverflow = true\n')
    path.write_text("".join(entries))


def build(path: Path) -> Runtime:
    settings = Settings(upstreams_file=path, window=2, access_log=False)
    config = load_config(None)
    keys = load_keyring(None, None)
    return build_runtime(settings, config, CollectorRegistry(), keys, load_upstreams_file(path))


def series(rt: Runtime, name: str) -> list[str]:
    text = generate_latest(rt.metrics.registry).decode()
    return [line for line in text.splitlines() if f'upstream="{name}"' in line]


def take_slot(rt: Runtime, name: str) -> Ticket:
    """A request running on ``name``, as the dispatcher would have sent it."""
    policy = rt.scheduler.classes.ordered[0]
    now = rt.dispatcher.now()
    ticket = Ticket("chat", policy, now, now + 60, now + 60)
    rt.scheduler.admit(ticket, now)
    assert [d.ticket for d in rt.scheduler.dispatch(now) if isinstance(d, Dispatch)] == [ticket]
    assert ticket.upstream == name
    return ticket


async def test_added_checked_drained_readded_and_forgotten(
    tmp_path: Path, fake: FakeVllm, other: FakeVllm
) -> None:
    path = tmp_path / "upstreams.toml"
    listing(path, fake.url)
    rt = build(path)
    assert rt.roster is not None
    a, b = upstream_name(fake.url), upstream_name(other.url)
    try:
        await rt.roster.refresh()
        assert rt.status.snapshot()["upstreams"][0]["state"] == "starting"
        assert not rt.scheduler.windows[a].usable  # no work before its health check
        await rt.upstreams.check_all()
        assert rt.scheduler.windows[a].usable
        assert rt.upstreams.any_up()
        running = take_slot(rt, a)  # the only upstream yet: it lands there

        listing(path, fake.url, other.url)
        rt.roster.wake()
        await rt.roster.refresh()
        assert set(rt.scheduler.windows) == {a, b}
        assert not rt.scheduler.windows[b].usable
        assert f'gateway_upstream_up{{upstream="{b}"}} 0.0' in series(rt, b)
        await rt.upstreams.check_all()
        assert rt.scheduler.windows[b].usable
        assert set(rt.sizing.controllers) == {a, b}
        assert rt.scheduler.windows[b].size == 2
        await rt.scraper.scrape_all()
        assert rt.scraper.loads[b] is not None

        listing(path, other.url)
        rt.roster.wake()
        await rt.roster.refresh()
        states = {u["name"]: u["state"] for u in rt.status.snapshot()["upstreams"]}
        assert states == {a: "draining", b: "up"}
        assert not rt.scheduler.windows[a].usable  # no new work goes there
        await rt.upstreams.check_all()  # a healthy check does not reopen a draining window
        assert not rt.scheduler.windows[a].usable

        listing(path, fake.url, other.url)  # listed again while draining: drain cancelled
        rt.roster.wake()
        await rt.roster.refresh()
        assert rt.scheduler.windows[a].usable
        assert not rt.upstreams[a].draining

        listing(path, other.url)
        rt.roster.wake()
        await rt.roster.refresh()
        await rt.roster.refresh()
        assert a in rt.scheduler.windows  # still running a request: kept
        rt.scheduler.release(running, rt.dispatcher.now())
        await rt.roster.refresh()
        assert a not in rt.upstreams.by_name
        assert a not in rt.scheduler.windows
        assert a not in rt.sizing.controllers
        assert a not in rt.scraper.loads
        assert [u["name"] for u in rt.status.snapshot()["upstreams"]] == [b]
        assert series(rt, a) == []
        assert series(rt, b) != []
        rt.upstreams.succeeded(a)  # a late report about a forgotten upstream is ignored
    finally:
        await close_runtime(rt)


async def test_an_overflow_upstream_is_marked_and_can_be_made_primary(
    tmp_path: Path, fake: FakeVllm, other: FakeVllm
) -> None:
    path = tmp_path / "upstreams.toml"
    listing(path, fake.url, overflow=other.url)
    rt = build(path)
    assert rt.roster is not None
    b = upstream_name(other.url)
    try:
        await rt.roster.refresh()
        await rt.upstreams.check_all()
        assert rt.scheduler.windows[b].overflow
        by_name = {u["name"]: u for u in rt.status.snapshot()["upstreams"]}
        assert by_name[b]["overflow"]
        assert by_name[b]["state"] == "up"
        listing(path, fake.url, other.url)
        rt.roster.wake()
        await rt.roster.refresh()
        assert not rt.scheduler.windows[b].overflow
        assert not rt.upstreams[b].overflow
    finally:
        await close_runtime(rt)
