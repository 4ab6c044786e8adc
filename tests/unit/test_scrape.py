"""Reading vLLM's load from its /metrics page: the parser, the loop, and the window it feeds."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from gateway.outbound import UpstreamClient
from gateway.scrape import (
    KV_CACHE,
    RUNNING,
    WAITING,
    ScrapeFailed,
    Scraper,
    VllmLoad,
    parse_line,
    read_load,
)
from gateway.upstreams import Upstream, upstream_name
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "hello"}]

#: An excerpt of vLLM 0.32's page: two engines, neighbours whose names share a prefix.
VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 4.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="qwen",reason="capacity"} 4.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="qwen",reason="deferred"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.5
vllm:num_requests_running_total{model_name="qwen"} 99.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="qwen"} 17.0
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="qwen"} 3.0
vllm:inter_token_latency_seconds_count{engine="0",model_name="qwen"} 40.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="qwen"} 2.5
vllm:inter_token_latency_seconds_count{engine="1",model_name="qwen"} 60.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="qwen"} 3.5
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="qwen"} 99.0
"""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("vllm:num_requests_running 3", ("vllm:num_requests_running", 3.0)),
        ('m{a="1",b="2"} 4.5', ("m", 4.5)),
        ('m{a="1",} 4.5', ("m", 4.5)),  # trailing comma is allowed
        ("m{} 1", ("m", 1.0)),
        ('m {a="1"} 2', ("m", 2.0)),  # blank between name and labels
        ('m{model_name="a}b c,d"} 5', ("m", 5.0)),  # } , and space inside a value
        (r'm{model_name="say \"hi\" }"} 6', ("m", 6.0)),  # escaped quotes
        (r'm{path="C:\\dir\\"} 7', ("m", 7.0)),  # an escaped backslash before the closing quote
        ("m 8 1712345678000", ("m", 8.0)),  # timestamp
        ("m\t9", ("m", 9.0)),
        ("  m 10  ", ("m", 10.0)),
        ("m 1e3", ("m", 1000.0)),
        ("m -0.5", ("m", -0.5)),
        ("m +Inf", ("m", math.inf)),
        ("m -Inf", ("m", -math.inf)),
        ("m 1\r", ("m", 1.0)),
    ],
)
def test_parse_line_reads_samples(line: str, expected: tuple[str, float]) -> None:
    assert parse_line(line) == expected


def test_parse_line_reads_nan() -> None:
    parsed = parse_line('m{a="b"} NaN')
    assert parsed is not None
    assert parsed[0] == "m"
    assert math.isnan(parsed[1])


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "# HELP m help text 3",
        "# TYPE m gauge",
        "#m 3",
        "m",
        "m ",
        'm{a="1"}',
        'm{a="1" 3',  # label set never closed
        'm{a="1} 3',  # quote never closed
        "m three",
        "{a=1} 3",  # no name
        "m 0x1g",
    ],
)
def test_parse_line_skips_comments_blanks_and_garbage(line: str) -> None:
    assert parse_line(line) is None


def test_read_load_sums_engines_and_ignores_neighbours() -> None:
    load = read_load(VLLM_PAGE, at=12.0)
    assert load == VllmLoad(
        running=5.0, waiting=4.0, kv_cache_usage=0.5, at=12.0, decode_s=6.0, decode_tokens=100.0
    )
    assert load.requests == 9


def test_read_load_handles_crlf_nan_and_a_missing_kv_gauge() -> None:
    page = f'{RUNNING} 1\r\n{RUNNING}{{engine="1"}} NaN\r\n{WAITING} 2\r\n'
    load = read_load(page, at=0.0)
    assert (load.running, load.waiting, load.kv_cache_usage) == (1.0, 2.0, None)
    assert (load.decode_s, load.decode_tokens) == (None, None)  # no histogram: no decode sample


@pytest.mark.parametrize(
    "page",
    [
        "",
        "<html>not metrics</html>",
        f"{WAITING} 2\n{KV_CACHE} 0.1\n",  # no running
        f"{RUNNING}_total 2\n{WAITING}_by_reason 1\n",  # only neighbours
        f"{RUNNING} NaN\n{WAITING} 1\n",
    ],
)
def test_read_load_refuses_a_page_without_the_scheduler_gauges(page: str) -> None:
    with pytest.raises(ScrapeFailed):
        read_load(page, at=0.0)


def test_requests_is_a_whole_non_negative_count() -> None:
    assert VllmLoad(2.0, 1.0, None, 0).requests == 3
    assert VllmLoad(0.6, 0.0, None, 0).requests == 1
    assert VllmLoad(-1.0, 0.0, None, 0).requests == 0


def test_others_is_the_load_that_is_not_ours() -> None:
    assert VllmLoad(3.0, 1.0, None, 0, ours=0).others == 4
    assert VllmLoad(3.0, 1.0, None, 0, ours=3).others == 1
    assert VllmLoad(1.0, 0.0, None, 0, ours=2).others == 0  # ours finished before the gauge
    assert read_load(VLLM_PAGE, at=0.0, ours=6).others == 3


def test_external_is_the_peak_of_this_reading_and_the_recent_ones() -> None:
    assert VllmLoad(0.0, 0.0, None, 0, held=2).external == 2  # a gap between two rounds
    assert VllmLoad(3.0, 0.0, None, 0, held=1).external == 3
    assert VllmLoad(3.0, 0.0, None, 0, ours=3, held=0).external == 0


async def test_ours_is_the_larger_count_around_the_scrape(fake: FakeVllm) -> None:
    """vLLM set its gauge between our two counts: assume the larger one was in it."""
    counts = iter([1, 3, 2, 0])
    seen: list[VllmLoad | None] = []
    client = UpstreamClient()
    upstream = Upstream(upstream_name(fake.url), fake.url)
    scraper = Scraper(
        [upstream], client, lambda n, load: seen.append(load), 1.0, Clock(), lambda n: next(counts)
    )
    await scraper.scrape_all()
    await scraper.scrape_all()
    assert [load.ours for load in seen if load is not None] == [3, 2]
    await client.close()


async def test_an_upstream_added_is_read_and_one_removed_mid_read_is_dropped(
    fake: FakeVllm,
) -> None:
    seen: list[tuple[str, VllmLoad | None]] = []
    removing: list[bool] = []

    def ours(n: str) -> int:
        if removing:  # the roster forgets it while its page is on the way
            scraper.remove(n)
        return 0

    client = UpstreamClient()
    name = upstream_name(fake.url)
    scraper = Scraper([], client, lambda n, load: seen.append((n, load)), 1.0, Clock(), ours)
    scraper.add(Upstream(name, fake.url))
    await scraper.scrape_all()
    assert [n for n, _ in seen] == [name]
    removing.append(True)
    await scraper.scrape(name)
    assert len(seen) == 1  # no callback about an upstream nobody knows any more
    assert name not in scraper.loads
    await client.close()


@asynccontextmanager
async def another_client_holds(fake: FakeVllm, n: int) -> AsyncIterator[None]:
    """While the block runs, another client (another gateway, say) holds ``n`` requests at
    the fake, sent straight to it; they end (cancelled) with the block."""
    fake.behaviour.first_token_delay_s = 30
    body = {"model": "x", "messages": USER}
    async with httpx.AsyncClient(base_url=fake.url, timeout=30) as other:
        calls = [
            asyncio.create_task(other.post("/v1/chat/completions", json=body)) for _ in range(n)
        ]
        try:
            async with asyncio.timeout(5):
                while fake.running < n:
                    await asyncio.sleep(0.01)
            yield
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)


async def test_a_lease_sync_between_read_and_count_explains_another_gateways_load(
    fake: FakeVllm,
) -> None:
    """With Redis, ``ours`` counts the other gateways' leased slots as this gateway last
    synced them. Another gateway that dispatched since then would be read as a client that is
    not a gateway, and that peak held for 2 s kept this gateway out of slots given back to it
    (one gateway ran its whole backlog first in 2 of 4 CI runs). The sync in ``settle``
    brings the count up to date before it is taken."""
    shared = {"n": 0}  # the other gateway's slots, as this one's leases know them

    async def settle(name: str) -> None:
        shared["n"] = 2  # what a sync now answers: the other gateway holds 2

    seen: list[VllmLoad | None] = []
    client = UpstreamClient()
    upstream = Upstream(upstream_name(fake.url), fake.url)
    async with another_client_holds(fake, 2):
        for hook in (None, settle):
            scraper = Scraper(
                [upstream], client, lambda n, load: seen.append(load), 1.0, Clock(),
                lambda n: shared["n"], settle=hook,
            )  # fmt: skip
            await scraper.scrape_all()
    assert [load.external for load in seen if load is not None] == [2, 0]
    await client.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("interval_s", "kept_s", "dropped_s"),
    [
        (5.0, 12.5, 17.5),  # stale after 3 intervals
        (1.0, 9.5, 10.5),  # but never before 10 s: a busy vLLM answers slowly
    ],
)
async def test_scraper_reads_the_fake_then_keeps_then_drops_a_stale_reading(
    fake: FakeVllm, interval_s: float, kept_s: float, dropped_s: float
) -> None:
    clock, seen = Clock(), []
    upstream = Upstream(upstream_name(fake.url), fake.url)
    client = UpstreamClient()
    scraper = Scraper([upstream], client, lambda n, load: seen.append((n, load)), interval_s, clock)
    async with another_client_holds(fake, 2):
        await scraper.scrape_all()
    assert seen == [(upstream.name, VllmLoad(2.0, 0.0, 0.1, 100.0))]
    assert scraper.errors == {}

    await fake.stop()  # from now on every scrape fails
    clock.now += kept_s
    await scraper.scrape_all()
    assert len(seen) == 1, "a failed scrape keeps the last reading"
    assert scraper.loads[upstream.name] == VllmLoad(2.0, 0.0, 0.1, 100.0)
    assert "unreachable" in scraper.errors[upstream.name]

    clock.now += dropped_s - kept_s
    await scraper.scrape_all()
    assert seen[-1] == (upstream.name, None)
    assert scraper.loads[upstream.name] is None
    await scraper.scrape_all()
    assert len(seen) == 2, "a stale reading is dropped once"
    await client.close()


@pytest.mark.parametrize(
    ("steps_s", "externals"),
    [
        ([1, 1, 1], [2, 2, 2, 0]),  # free for HOLD_S (2 s) at 1 s intervals: the 4th reading
        ([5, 5, 5], [2, 2, 0, 0]),  # longer intervals: free in two readings in a row
        ([2.5, 0.5, 1, 0.6], [2, 2, 2, 2, 0]),  # a slow scrape first: 2 s from the first 0
    ],
)
async def test_a_freed_slot_counts_as_free_once_it_stayed_free(
    fake: FakeVllm, steps_s: list[float], externals: list[int]
) -> None:
    seen: list[VllmLoad | None] = []
    clock = Clock()
    upstream = Upstream(upstream_name(fake.url), fake.url)
    client = UpstreamClient()
    scraper = Scraper([upstream], client, lambda n, load: seen.append(load), 1.0, clock)
    async with another_client_holds(fake, 2):
        await scraper.scrape_all()
    async with asyncio.timeout(5):
        while fake.running:
            await asyncio.sleep(0.01)
    for step in steps_s:  # freed, but it could be a gap before the other client's next request
        clock.now += step
        await scraper.scrape_all()
    assert [load.others for load in seen if load is not None] == [2] + [0] * len(steps_s)
    assert [load.external for load in seen if load is not None] == externals
    await client.close()


async def test_scraper_loop_survives_a_failing_callback(fake: FakeVllm) -> None:
    calls = 0

    def on_load(name: str, load: VllmLoad | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    client = UpstreamClient()
    upstream = Upstream(upstream_name(fake.url), fake.url)
    scraper = Scraper([upstream], client, on_load, 0.01, asyncio.get_running_loop().time)
    loop = asyncio.create_task(scraper.run())
    async with asyncio.timeout(5):
        while calls < 3:
            await asyncio.sleep(0.01)
    assert not loop.done()
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    await client.close()


async def metric(client: httpx.AsyncClient, line_prefix: str) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starts with {line_prefix}")


async def test_the_gateway_waits_while_another_client_fills_the_upstream(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    """Two gateways share one vLLM: requests another one sent count against our window."""
    name = upstream_name(fake.url)
    async with (
        start_gateway(window=2, health_interval_s=0.05) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        assert await metric(c, f'gateway_window_size{{upstream="{name}"}}') == 2.0
        async with another_client_holds(fake, 2):
            async with asyncio.timeout(5):
                while await metric(c, f'gateway_upstream_running{{upstream="{name}"}}') < 2:
                    await asyncio.sleep(0.02)
            assert await metric(c, f'gateway_upstream_waiting{{upstream="{name}"}}') == 0.0
            ratio = await metric(c, f'gateway_upstream_kv_cache_usage_ratio{{upstream="{name}"}}')
            assert ratio == 0.1

            fake.behaviour.first_token_delay_s = 0.0
            ours = asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
            )
            await asyncio.sleep(0.5)  # ten scrape intervals: it stays queued while vLLM is full
            assert not ours.done()
            assert await metric(c, 'gateway_queue_depth{priority_class="interactive"}') == 1.0
            assert len(fake.seen) == 2
        # The other gateway's requests ended with the block; the next scrape frees the window.
        r = await asyncio.wait_for(ours, 5)
        assert r.status_code == 200
