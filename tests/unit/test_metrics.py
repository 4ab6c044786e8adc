"""The autoscaling signals on a real /metrics page: saturation and the oldest queued wait,
read live from the scheduler while requests are in flight and queued at an in-process gateway.
(The arithmetic itself is tested on the pure scheduler in test_scheduler.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.classes import DEFAULT_POLICIES
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "hello"}]


async def scrape(c: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await c.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def oldest(pclass: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("gateway_queue_oldest_wait_seconds", (("priority_class", pclass),))


SATURATION = ("gateway_saturation_ratio", ())
BATCH_DEPTH = ("gateway_queue_depth", (("priority_class", "batch"),))


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.02)


async def test_saturation_and_oldest_wait_follow_the_queue(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 60  # what is sent stays in flight until cancelled
    async with (
        start_gateway(window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=90) as c,
    ):
        idle = await scrape(c)
        assert idle[SATURATION] == 0.0
        for policy in DEFAULT_POLICIES:  # every class has its series, at 0 when empty
            assert idle[oldest(policy.name)] == 0.0

        def post(task: str) -> asyncio.Task[httpx.Response]:
            body = {"model": task, "messages": USER}
            return asyncio.create_task(c.post("/v1/chat/completions", json=body))

        pending = [post("chat")]

        async def one_in_flight() -> bool:
            return (
                sum(
                    v for (n, _), v in (await scrape(c)).items() if n == "gateway_inflight_requests"
                )
                == 1
            )

        await until(one_in_flight)
        pending += [post("batch"), post("batch")]

        async def two_batch_queued() -> bool:
            return (await scrape(c))[BATCH_DEPTH] == 2

        await until(two_batch_queued)
        first = await scrape(c)
        assert first[SATURATION] == 3.0  # 1 in flight + 2 queued over a window of 1
        assert first[oldest("batch")] > 0
        assert first[oldest("interactive")] == 0.0  # its request is running, not waiting

        async def older() -> bool:  # the age is read at scrape time: it grows while queued
            return (await scrape(c))[oldest("batch")] > first[oldest("batch")]

        await until(older)

        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

        async def drained() -> bool:
            now = await scrape(c)
            return now[SATURATION] == 0.0 and now[oldest("batch")] == 0.0

        await until(drained)
