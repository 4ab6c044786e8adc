"""Faults with two upstreams (two fake vLLMs): failover, circuit breakers, load spreading,
hung streams and disconnect storms, through a real gateway on a loopback socket."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.classes import DEFAULT_POLICIES, ClassTable
from gateway.scheduler import Dispatch, Scheduler, Ticket, Window
from gateway.settings import Settings
from tests.fake_vllm import FakeVllm, Seen
from tests.servers import running_gateway
from tests.support import metric, until
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "hello"}]
CHAT = {"model": "chat", "messages": USER}
STREAM = {**CHAT, "stream": True}
CLOSED, HALF_OPEN, OPEN = 0.0, 1.0, 2.0

PairFactory = Callable[..., AbstractAsyncContextManager[str]]


@pytest.fixture
async def other() -> AsyncIterator[FakeVllm]:
    upstream = FakeVllm(model="fake-qwen")
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def start_pair(fake: FakeVllm, other: FakeVllm) -> PairFactory:
    """A gateway in front of both fakes; ``fake`` comes first, so it wins ties. Routing is
    least-loaded: these tests place work by load, task affinity is tests/unit/test_routing.py."""

    def start(**changes: object) -> AbstractAsyncContextManager[str]:
        base: dict[str, object] = {
            "upstreams": (fake.url, other.url),
            "window": 4,
            "window_mode": "fixed",
            "routing": "least-loaded",
            "health_interval_s": 0.2,
            "access_log": False,
        }
        return running_gateway(Settings(**{**base, **changes}))  # type: ignore[arg-type]

    return start


def name(upstream: FakeVllm) -> str:
    return upstream.url.split("://", 1)[1]


async def breaker(c: httpx.AsyncClient, upstream: FakeVllm) -> float:
    return await metric(c, f'gateway_upstream_breaker_state{{upstream="{name(upstream)}"}}')


async def up(c: httpx.AsyncClient, upstream: FakeVllm) -> float:
    return await metric(c, f'gateway_upstream_up{{upstream="{name(upstream)}"}}')


async def until_breaker(
    c: httpx.AsyncClient, upstream: FakeVllm, state: float, timeout_s: float = 5.0
) -> None:
    async with asyncio.timeout(timeout_s):
        while await breaker(c, upstream) != state:
            await asyncio.sleep(0.02)


def stream_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.text.splitlines() if line]


def assert_clean_stream(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    lines = stream_lines(response)
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines), lines
    assert any('"content":"Hello"' in line for line in lines)


# -- failover -------------------------------------------------------------------------------


async def test_one_upstream_down_all_traffic_is_served_by_the_other(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        await fake.stop()
        responses = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=CHAT if i % 2 else STREAM) for i in range(20))
        )
        for i, r in enumerate(responses):
            if i % 2:
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == "Hello there friend"
            else:
                assert_clean_stream(r)
        assert len(other.seen) == 20
        # Unusable either way: its breaker opened on the failed requests, or a health check
        # found nothing listening first and polls it as starting (which resets the breaker).
        async with asyncio.timeout(20):
            while await up(c, fake) != 0:
                await asyncio.sleep(0.02)
        assert await up(c, other) == 1
        ready = await c.get("/ready")
        assert ready.status_code == 200  # one usable upstream is enough
        assert ready.json()["upstreams"][name(fake)]["up"] is False
        assert ready.json()["upstreams"][name(fake)]["error"]


class DyingVllm(FakeVllm):
    """Takes a request, then dies mid-generation: the connection drops without an answer."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(await request.json(), CIMultiDict(request.headers), 0.0))
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.close()
        await asyncio.Event().wait()  # cancelled when aiohttp notices the lost connection
        raise AssertionError("unreachable")


async def test_a_non_stream_cut_off_before_its_answer_is_sent_again(other: FakeVllm) -> None:
    dying = DyingVllm()
    await dying.start()
    settings = Settings(
        upstreams=(dying.url, other.url),
        window=4,
        routing="least-loaded",  # the tie goes to the first: dying
        health_interval_s=0.2,
        access_log=False,
    )
    try:
        async with (
            running_gateway(settings) as url,
            httpx.AsyncClient(base_url=url, timeout=20) as c,
        ):
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            assert len(dying.seen) == 1  # it went there first (the tie), and died
            assert len(other.seen) == 1
    finally:
        await dying.stop()


async def test_breaker_opens_after_failures_and_closes_when_the_upstream_is_back(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    port = int(fake.url.rsplit(":", 1)[1])
    # Health checks only every 30 s: the probe at the end of the cool-down is planned when
    # the breaker opens, not left to the next regular check.
    async with (
        start_pair(health_interval_s=30) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as c,
    ):
        await fake.stop()
        for _ in range(3):  # each fails over: nobody sees the dead upstream
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await until_breaker(c, fake, OPEN)
        opened = time.monotonic()
        await fake.start(port)  # back at once, but the cool-down (5 s) runs its course
        await asyncio.sleep(1)
        assert await breaker(c, fake) == OPEN
        await until_breaker(c, fake, CLOSED, timeout_s=10)
        assert time.monotonic() - opened > 4.5
        assert await up(c, fake) == 1
        assert (await c.get("/ready")).json()["upstreams"][name(fake)]["up"] is True
        await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(4)))
        assert len(fake.seen) >= 2  # it gets work again


async def test_an_upstream_that_was_never_up_is_polled_not_tripped(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    """A gateway started before its vLLM sees it as soon as it is up, however long that took."""
    port = int(fake.url.rsplit(":", 1)[1])
    await fake.stop()
    settings = Settings(upstreams=(fake.url,), health_interval_s=0.2, access_log=False)
    async with (
        running_gateway(settings, wait_ready=False) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as c,
    ):
        await asyncio.sleep(1.5)  # several failed checks: a breaker would have opened
        assert (await c.get("/ready")).status_code == 503
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "no_upstream")
        assert int(r.headers["retry-after"]) >= 1  # every 503 says when to come back
        assert await breaker(c, fake) == CLOSED
        await fake.start(port)
        async with asyncio.timeout(2):
            while (await c.get("/ready")).status_code != 200:
                await asyncio.sleep(0.05)


async def test_failing_health_checks_open_the_breaker(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        fake.behaviour.healthy = False
        await until_breaker(c, fake, OPEN)  # three failed checks, 0.2 s apart
        for _ in range(4):
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert not fake.seen
        assert len(other.seen) == 4


@pytest.mark.parametrize(
    ("status", "body", "client_status", "retried"),
    [
        (503, CHAT, 200, True),  # 503: nothing was generated, safe to send elsewhere
        # vLLM is always asked for a stream (see gateway.chunks), so a 500 status comes
        # before anything was generated, for a client's non-streaming request too
        (500, CHAT, 200, True),
        (500, STREAM, 200, True),  # a stream that has not started may go elsewhere
        (503, STREAM, 200, True),
        (400, CHAT, 400, False),  # the client's error, not the upstream's
        (400, STREAM, 400, False),
    ],
)
async def test_what_fails_over(
    start_pair: PairFactory,
    fake: FakeVllm,
    other: FakeVllm,
    status: int,
    body: dict[str, object],
    client_status: int,
    retried: bool,
) -> None:
    fake.behaviour.status = status
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == client_status, r.text
        assert len(fake.seen) == 1
        assert len(other.seen) == (1 if retried else 0)
        if retried and body.get("stream"):
            assert_clean_stream(r)
        if retried:  # the retry went out with the other upstream's model and a fresh priority
            assert other.seen[0].body["model"] == other.model
            assert other.seen[0].body["priority"] == fake.seen[0].body["priority"]


async def test_an_upstream_answering_500s_gets_its_breaker_opened(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    fake.behaviour.status = 500  # its /health still answers 200
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        for _ in range(2):
            assert_clean_stream(await c.post("/v1/chat/completions", json=STREAM))
        await until_breaker(c, fake, OPEN)  # three 500s in a row, passing health checks or not
        assert len(fake.seen) == 3
        for _ in range(5):
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert len(fake.seen) == 3
        assert len(other.seen) == 8


async def test_a_non_streaming_answer_cut_off_mid_generation_is_not_retried(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    """Tokens were generated: the client gets a 502 rather than a second generation."""
    fake.behaviour.break_after_chunks = 2
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["type"] == "upstream_error"
        assert not other.seen
        assert await metric(c, 'gateway_inflight_requests{upstream="') == 0


async def test_both_upstreams_failing_is_the_last_error(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    fake.behaviour.status = other.behaviour.status = 503
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_busy"
        assert int(r.headers["retry-after"]) >= 1
        assert (len(fake.seen), len(other.seen)) == (1, 1)  # one try per upstream, no more
        assert await metric(c, 'gateway_inflight_requests{upstream="') == 0


async def test_a_retry_keeps_the_original_deadline(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 0.4
    fake.behaviour.status = 503  # answers 503 only after 0.4 s
    other.behaviour.first_token_delay_s = 30
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        started = time.monotonic()
        r = await c.post(
            "/v1/chat/completions", json=CHAT, headers={"X-Request-Deadline-Ms": "1000"}
        )
        assert r.status_code == 504
        assert time.monotonic() - started < 1.5  # not 1 s more after the retry
        assert len(other.seen) == 1
        await until(lambda: other.running == 0)  # the retry was aborted at the deadline


def test_a_failed_over_ticket_avoids_the_upstreams_it_tried() -> None:
    """The scheduler seam: ``avoid`` beats least-loaded while another upstream is usable."""
    classes = ClassTable(DEFAULT_POLICIES)
    a, b = Window("a", 4), Window("b", 4, inflight=3)
    sched = Scheduler(classes, 16, [a, b])
    retry = Ticket("chat", classes["interactive"], 0.0, 10.0, 10.0, avoid=frozenset({"a"}))
    sched.admit(retry, 0.0)
    assert sched.dispatch(0.0) == []  # a is idle, but it failed this request: wait for b
    b.inflight = 2
    assert [d.ticket for d in sched.dispatch(0.0) if isinstance(d, Dispatch)] == [retry]
    assert retry.upstream == "b"

    again = Ticket("chat", classes["interactive"], 0.0, 10.0, 10.0, avoid=frozenset({"a"}))
    sched.admit(again, 0.0)
    b.usable = False  # b went away meanwhile: better the upstream that failed once than none
    assert [d.ticket for d in sched.dispatch(0.0) if isinstance(d, Dispatch)] == [again]
    assert again.upstream == "a"


# -- least-loaded dispatch -------------------------------------------------------------------


async def test_load_spreads_over_both_upstreams(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = other.behaviour.first_token_delay_s = 0.3
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        responses = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=CHAT) for _ in range(8))
        )
        assert [r.status_code for r in responses] == [200] * 8
        assert len(fake.seen) == len(other.seen) == 4


async def test_scraped_load_from_other_clients_steers_dispatch(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    """Another client (say, another gateway) keeps ``fake`` busy: new work goes to ``other``."""
    fake.behaviour.first_token_delay_s = 1.5
    async with (
        start_pair() as url,
        httpx.AsyncClient(base_url=url, timeout=20) as c,
        httpx.AsyncClient(base_url=fake.url, timeout=20) as direct,
    ):
        outside = [
            asyncio.create_task(direct.post("/v1/chat/completions", json={"messages": USER}))
            for _ in range(3)
        ]
        await until(lambda: fake.running == 3)
        async with asyncio.timeout(5):  # the next scrape (every 0.2 s) sees them
            while await metric(c, f'gateway_upstream_running{{upstream="{name(fake)}"}}') != 3:
                await asyncio.sleep(0.02)
        await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(4)))
        assert len(fake.seen) - 3 <= 1  # at most the tie at 3/4 each went to the busy one
        assert len(other.seen) >= 3
        await asyncio.gather(*outside)


# -- streams that hang, clients that leave ---------------------------------------------------


async def test_stream_hanging_mid_way_ends_with_an_in_band_error(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.chunk_delay_s = 60  # the first word comes at once, then nothing
    async with (
        start_gateway(read_timeout_s=0.5) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as c,
    ):
        started = time.monotonic()
        r = await c.post("/v1/chat/completions", json=STREAM)
        assert time.monotonic() - started < 3
        assert r.status_code == 200
        lines = stream_lines(r)
        assert any('"content":"Hello"' in line for line in lines)
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "upstream_timeout")
        await asyncio.wait_for(fake.client_gone.wait(), 5)  # the hung request was dropped
        assert await metric(c, 'gateway_inflight_requests{upstream="') == 0


async def test_disconnect_storm_leaks_nothing(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    """50 clients leave: 14 mid-stream, 10 while queued, 26 mid-stream once they got in."""
    async with (
        start_gateway(window=16) as url,
        httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=100)) as c,
    ):
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200  # warm up
        tasks_before = len(asyncio.all_tasks())
        fake.behaviour.chunk_delay_s = 0.2
        fake.behaviour.reply = " ".join(["word"] * 100)  # 20 s per stream unless dropped
        leave = asyncio.Event()

        async def client(hold: bool) -> None:
            async with c.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                async for line in r.aiter_lines():
                    if '"content":"word"' in line:
                        if hold:
                            await leave.wait()
                        return  # leaves mid-stream

        # Interactive work leaves 2 of the 16 slots to more important classes: 14 fit.
        holders = [asyncio.create_task(client(hold=True)) for _ in range(14)]
        await until(lambda: fake.running == 14)
        queued = [asyncio.create_task(client(hold=False)) for _ in range(36)]
        await until_queue_depth(c, 36)
        for task in queued[:10]:
            task.cancel()  # ten give up while waiting in the queue
        await until_queue_depth(c, 26)
        leave.set()
        await asyncio.gather(*holders, *queued[10:])

        await until(lambda: fake.running == 0)
        async with asyncio.timeout(5):
            while await metric(c, 'gateway_inflight_requests{upstream="') != 0:
                await asyncio.sleep(0.02)
        assert await metric(c, 'gateway_queue_depth{priority_class="interactive"}') == 0
        assert len(fake.seen) == 1 + 14 + 26  # the ten that left while queued never got there
        assert fake.aborted == 40
        assert fake.finished == 1  # only the warm-up ran to the end
        async with asyncio.timeout(5):  # handlers wind down a moment after their sockets
            while len(asyncio.all_tasks()) > tasks_before + 2:
                await asyncio.sleep(0.05)
        fake.behaviour.reply = "still serving"
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def until_queue_depth(c: httpx.AsyncClient, depth: float) -> None:
    async with asyncio.timeout(20):  # 36 clients connecting on a busy 2-core machine
        while await metric(c, 'gateway_queue_depth{priority_class="interactive"}') != depth:
            await asyncio.sleep(0.02)


async def test_a_refused_connection_is_polled_as_a_restart_not_backed_off(
    start_pair: PairFactory, fake: FakeVllm, other: FakeVllm
) -> None:
    """A vLLM that is restarting refuses connections. Backing off (5 s, 10, 20... up to 60 s
    per failed probe) added up to a minute to serve.sh's recovery after it restarted vLLM;
    nothing listening costs nothing to poll, so it is polled as a starting upstream."""
    port = int(fake.url.rsplit(":", 1)[1])
    async with start_pair() as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        # Opened by failing health checks, not by failing requests: a check that found
        # nothing listening between those requests would reset the breaker (the point of
        # this test), so only this order is deterministic.
        fake.behaviour.healthy = False
        await until_breaker(c, fake, OPEN)  # three failed checks, 0.2 s apart
        await fake.stop()
        # The probe after the cool-down (5 s) finds nothing listening...
        await until_breaker(c, fake, CLOSED, timeout_s=8)
        assert await up(c, fake) == 0
        back = time.monotonic()
        fake.behaviour.healthy = True
        await fake.start(port)  # ...and the upstream is used as soon as it listens again
        async with asyncio.timeout(3):
            while await up(c, fake) != 1:
                await asyncio.sleep(0.05)
        assert time.monotonic() - back < 2  # not the 10 s of a second cool-down
