"""Admission policies through the app: a request that could not make its deadline is refused
at once (429 + Retry-After), not queued to fail late."""

from __future__ import annotations

import asyncio

import httpx

from tests.fake_vllm import FakeVllm
from tests.support import assert_envelope, metric, until
from tests.unit.conftest import GatewayFactory

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_request_that_cannot_make_its_deadline_is_refused_at_once(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.first_token_delay_s = 0.1
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        for _ in range(10):  # the evidence: ~0.1 s per chat answer, ten of them
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        held = asyncio.Event()
        fake.behaviour.hold_after_first = held
        busy = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        await until(lambda: fake.running == 1)
        queued = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        async with asyncio.timeout(5):
            while await metric(c, 'gateway_queue_depth{priority_class="interactive"}') < 1:
                await asyncio.sleep(0.01)
        hurried = await c.post(
            "/v1/chat/completions", json=CHAT, headers={"X-Request-Deadline-Ms": "150"}
        )
        error = assert_envelope(hurried, 429, "deadline_unreachable")
        assert "deadline" in error["message"]
        assert int(hurried.headers["Retry-After"]) >= 1
        line = (
            'gateway_rejections_total{priority_class="interactive",reason="deadline_unreachable"}'
        )
        assert await metric(c, line) == 1
        held.set()
        assert (await busy).status_code == 200
        assert (await queued).status_code == 200  # with time enough, it was queued and served
