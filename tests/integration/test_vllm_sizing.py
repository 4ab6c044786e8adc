"""The adaptive window against a real vLLM: it reads vLLM's own decode histogram and shrinks
when the measured pace misses the task table's target.

The tiny model decodes far faster than any real SLA asks, so a table whose chat pace is
unreachable (a few microseconds per token) stands in for an overloaded upstream: the only
way the window can learn that is vLLM's inter-token latency histogram, read from its
``/metrics`` page, so this also checks the metric's name against the installed vLLM.
"""

from __future__ import annotations

import asyncio

import httpx

from gateway.upstreams import upstream_name
from tests.integration.conftest import GatewayFactory
from tests.integration.test_vllm_scheduling import table
from tests.support import metric
from tests.vllm_server import VllmServer

GO = [{"role": "user", "content": "go"}]


async def test_an_unreachable_decode_pace_shrinks_the_window(
    vllm: VllmServer, start_gateway: GatewayFactory
) -> None:
    # 1 ms left after the first token's budget (half of 2 s): 5 us per token for 200 tokens
    unreachable = {"sla_ttft_s": 2, "sla_latency_s": 1.001, "max_tokens": 200}
    config = table(tasks={"chat": unreachable})
    window = f'gateway_window_size{{upstream="{upstream_name(vllm.url)}"}}'
    async with (
        start_gateway(vllm, config, window_mode="adaptive") as url,
        httpx.AsyncClient(base_url=url, timeout=300) as c,
    ):
        assert await metric(c, window) == vllm.max_num_seqs  # starts at its ceiling
        stop = asyncio.Event()

        async def client() -> list[int]:
            statuses = []
            while not stop.is_set():
                r = await c.post("/v1/chat/completions", json={"model": "chat", "messages": GO})
                statuses.append(r.status_code)
            return statuses

        clients = [asyncio.create_task(client()) for _ in range(6)]
        try:
            async with asyncio.timeout(120):  # scrapes every 0.5 s; a stalled CPU is slower
                while await metric(c, window) >= vllm.max_num_seqs:
                    await asyncio.sleep(0.25)
        finally:
            stop.set()
            results = await asyncio.gather(*clients)
        assert await metric(c, window) < vllm.max_num_seqs
        statuses = [s for r in results for s in r]
        assert statuses
        assert set(statuses) == {200}  # a smaller window queues work; it loses none
