"""Disconnects, deadlines, admission and ordering, end to end through the gateway and the fake."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

import httpx

from gateway.config import load_config, parse_config
from tests.fake_vllm import FakeVllm
from tests.support import metric, until
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "hello"}]


async def test_client_leaving_a_stream_aborts_the_upstream_request(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    fake.behaviour.chunk_delay_s = 0.2
    fake.behaviour.reply = " ".join(["word"] * 100)
    async with client.stream(
        "POST", "/v1/chat/completions", json={"model": "chat", "stream": True, "messages": USER}
    ) as r:
        async for line in r.aiter_lines():
            if "word" in line:
                break  # leave after the first token
    await asyncio.wait_for(fake.client_gone.wait(), 5)
    assert fake.aborted == 1
    await until(lambda: fake.running == 0)
    await until_metric(client, 'gateway_inflight_requests{upstream="', 0.0)
    assert fake.finished == 0


async def until_metric(client: httpx.AsyncClient, prefix: str, value: float) -> None:
    async with asyncio.timeout(20):  # a hang guard; a busy 2-core machine is slow
        while await metric(client, prefix) != value:
            await asyncio.sleep(0.02)


async def test_client_leaving_a_json_request_aborts_the_upstream_request(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 30
    call = asyncio.create_task(
        client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    )
    await until(lambda: fake.running == 1)
    call.cancel()
    await asyncio.wait_for(fake.client_gone.wait(), 5)
    await until(lambda: fake.running == 0)
    assert fake.finished == 0


async def test_client_leaving_while_queued_never_reaches_the_upstream(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 30
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        blocker = asyncio.create_task(
            c.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        )
        await until(lambda: fake.running == 1)
        queued = asyncio.create_task(
            c.post("/v1/chat/completions", json={"model": "batch", "messages": USER})
        )
        await until_metric(c, 'gateway_queue_depth{priority_class="batch"}', 1.0)
        queued.cancel()
        await until_metric(c, 'gateway_queue_depth{priority_class="batch"}', 0.0)
        blocker.cancel()
        await until(lambda: fake.running == 0)
        assert len(fake.seen) == 1  # the queued request was never sent


async def test_deadline_in_flight_is_504_and_aborts_upstream(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 30
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": USER},
        headers={"X-Request-Deadline-Ms": "300"},
    )
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"
    await asyncio.wait_for(fake.client_gone.wait(), 5)
    assert (
        await metric(client, 'gateway_deadline_exceeded_total{stage="upstream",task="chat"}') == 1.0
    )


async def test_deadline_mid_stream_is_an_in_band_error_then_done(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    fake.behaviour.chunk_delay_s = 0.1
    fake.behaviour.reply = " ".join(["word"] * 200)
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": USER, "stream": True},
        headers={"X-Request-Deadline-Ms": "500"},
    )
    assert r.status_code == 200  # the stream had started
    lines = [line for line in r.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "deadline_exceeded"
    assert any('"content":"word"' in line for line in lines)
    await asyncio.wait_for(fake.client_gone.wait(), 5)


async def test_deadline_in_queue_is_504_and_never_dispatched(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 30
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        blocker = asyncio.create_task(
            c.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        )
        await until(lambda: fake.running == 1)
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "sentiment", "messages": USER},
            headers={"X-Request-Deadline-Ms": "200"},
        )
        assert r.status_code == 504
        assert "queue" in r.json()["error"]["message"]
        assert len(fake.seen) == 1
        assert (
            await metric(c, 'gateway_deadline_exceeded_total{stage="queue",task="sentiment"}')
            == 1.0
        )
        blocker.cancel()


async def test_deadline_header_only_tightens(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": USER},
        headers={"X-Request-Deadline-Ms": "99999999"},
    )
    assert r.status_code == 200
    for bad in ("soon", "-5", "0"):
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": USER},
            headers={"X-Request-Deadline-Ms": bad},
        )
        assert r.status_code == 400


async def test_full_queue_is_429_with_retry_after(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    table = load_config()
    config = parse_config(
        {
            "classes": {"batch": {"max_queued": 2}},
            "tasks": {"batch": {"class": "batch"}, "chat": {"class": "interactive"}},
        }
    )
    assert table.tasks  # the shipped table is untouched
    fake.behaviour.first_token_delay_s = 30
    async with (
        start_gateway(config, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        running = asyncio.create_task(
            c.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        )
        await until(lambda: fake.running == 1)
        queued = [
            asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": "batch", "messages": USER})
            )
            for _ in range(2)
        ]
        await until_metric(c, 'gateway_queue_depth{priority_class="batch"}', 2.0)
        r = await c.post("/v1/chat/completions", json={"model": "batch", "messages": USER})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "class_queue_full"
        assert "batch queue is full" in r.json()["error"]["message"]
        assert (
            await metric(
                c, 'gateway_rejections_total{priority_class="batch",reason="class_queue_full"}'
            )
            == 1.0
        )
        for task in (running, *queued):
            task.cancel()
        await until_metric(c, 'gateway_queue_depth{priority_class="batch"}', 0.0)


async def test_realtime_overtakes_queued_batch(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 0.3
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:

        def send(task: str) -> Awaitable[httpx.Response]:
            return asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": task, "messages": USER})
            )

        first = send("batch")
        await until(lambda: len(fake.seen) == 1)
        batch = [send("batch") for _ in range(3)]
        await until_metric(c, 'gateway_queue_depth{priority_class="batch"}', 3.0)
        realtime = send("sentiment")  # the running batch request is paused for it
        await asyncio.gather(first, realtime, *batch)
        order = [s.body["priority"] for s in fake.seen]
        assert fake.seen[1].body.get("structured_outputs")  # sentiment went second
        assert await metric(c, 'gateway_preemptions_total{priority_class="batch"}') == 1
        assert order[1] < min(order[2:])
