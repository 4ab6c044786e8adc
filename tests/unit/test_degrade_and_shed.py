"""Degradation under overload and shedding, through the gateway."""

from __future__ import annotations

import asyncio

import httpx

from gateway.config import parse_config
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

USER = [{"role": "user", "content": "hello"}]


async def test_chat_is_degraded_when_the_predicted_wait_is_long(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    config = parse_config(
        {
            "tasks": {
                "chat": {
                    "class": "interactive",
                    "max_tokens": 256,
                    "degrade": {"when_wait_s": 0.05, "max_tokens": 16},
                    "queue_deadline_s": 30,
                    "tools": True,
                },
                "filler": {"class": "realtime", "queue_deadline_s": 30},
            }
        }
    )
    fake.behaviour.first_token_delay_s = 0.2
    async with (
        start_gateway(config, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):
        calm = await c.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        assert "x-degraded" not in calm.headers
        assert fake.seen[-1].body["max_tokens"] == 256
        # A backlog: the drain rate is known (one done), the window is full, work is queued.
        backlog = [
            asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": "filler", "messages": USER})
            )
            for _ in range(4)
        ]
        while len(fake.seen) < 2:
            await asyncio.sleep(0.01)
        # A tool call cut short is no answer: a request with tools keeps its max_tokens.
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        busy, with_tools = await asyncio.gather(
            c.post("/v1/chat/completions", json={"model": "chat", "messages": USER}),
            c.post(
                "/v1/chat/completions", json={"model": "chat", "messages": USER, "tools": [tool]}
            ),
        )
        await asyncio.gather(*backlog)
        assert busy.status_code == 200
        assert busy.headers["x-degraded"] == "max_tokens=16"
        assert "x-degraded" not in with_tools.headers
        sent = {("tools" in s.body, s.body["max_tokens"]) for s in fake.seen[-2:]}
        assert sent == {(False, 16), (True, 256)}
        metrics = (await c.get("/metrics")).text
        assert 'gateway_degraded_total{task="chat"} 1.0' in metrics


async def test_a_full_queue_sheds_the_least_important_request(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    config = parse_config(
        {
            "queue": {"max_queued": 2},
            "tasks": {
                "rt": {"class": "realtime", "queue_deadline_s": 30},
                "bg": {"class": "background", "queue_deadline_s": 30},
            },
        }
    )
    fake.behaviour.first_token_delay_s = 0.3
    async with (
        start_gateway(config, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):

        def send(task: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(
                c.post("/v1/chat/completions", json={"model": task, "messages": USER})
            )

        running = send("bg")
        while not fake.seen:
            await asyncio.sleep(0.01)
        old_bg = send("bg")
        await asyncio.sleep(0.05)
        new_bg = send("bg")
        await asyncio.sleep(0.05)
        rt = send("rt")  # the queue (2) is full: the newest background request makes room
        shed = await new_bg
        assert shed.status_code == 503
        assert shed.json()["error"]["code"] == "shed"
        assert int(shed.headers["retry-after"]) >= 1
        for task in (running, old_bg, rt):
            assert (await task).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert 'gateway_rejections_total{priority_class="background",reason="shed"} 1.0' in metrics
        assert 'gateway_queue_depth{priority_class="background"} 0.0' in metrics


async def test_a_stream_that_cannot_start_within_its_sla_is_refused_not_served_late(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    """A stream still queued when its time to first token can no longer be met gets a 429
    with Retry-After then, not a late answer; a whole answer in the same spot (its SLA is
    its latency) and a task with ``serve_late`` are served when the slot frees."""
    sla = {"class": "interactive", "queue_deadline_s": 30, "sla_ttft_s": 0.3}
    config = parse_config(
        {
            "tasks": {
                "chat": sla,
                "patient": {**sla, "serve_late": True},
                "filler": {"class": "realtime", "queue_deadline_s": 30},
            }
        }
    )
    fake.behaviour.first_token_delay_s = 1.5
    async with (
        start_gateway(config, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as c,
    ):

        def send(task: str, stream: bool) -> asyncio.Task[httpx.Response]:
            body = {"model": task, "messages": USER, "stream": stream}
            return asyncio.create_task(c.post("/v1/chat/completions", json=body))

        filler = send("filler", False)
        while not fake.seen:
            await asyncio.sleep(0.01)
        refused, whole, patient = send("chat", True), send("chat", False), send("patient", True)
        answer = await refused
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "sla_unreachable"
        assert answer.json()["error"]["type"] == "rate_limit_error"
        assert int(answer.headers["retry-after"]) >= 1
        assert not filler.done()  # refused while the slot was still taken: not served late
        for task in (filler, whole, patient):
            assert (await task).status_code == 200
        assert len(fake.seen) == 3  # the refused stream never reached the upstream
        metrics = (await c.get("/metrics")).text
        assert (
            'gateway_rejections_total{priority_class="interactive",reason="sla_unreachable"} 1.0'
            in metrics
        )
        assert (
            'gateway_requests_total{outcome="rejected",priority_class="interactive",task="chat"} 1.0'
            in metrics
        )
