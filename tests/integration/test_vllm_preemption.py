"""Preempt and resume on a real vLLM (CPU build, tiny model): a long batch generation,
streamed or not, is paused twice for realtime requests and still comes back as one answer.

The server runs one sequence at a time (``--max-num-seqs 1``) and the gateway's window is 1,
so every realtime request must take the batch request's slot. (Whether a resumed answer
equals the uninterrupted one token for token is checked on the real model, in the e2e tier:
this model's random output does not survive a round trip through text.)
"""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.integration.conftest import GatewayFactory
from tests.support import metric
from tests.vllm_server import VllmServer

WRITE = [{"role": "user", "content": "Write a long story."}]
SENTIMENT = {"model": "sentiment", "messages": [{"role": "user", "content": "I love it"}]}
TOKENS = 300


async def label(c: httpx.AsyncClient) -> None:
    r = await c.post("/v1/chat/completions", json=SENTIMENT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("positive", "negative")


async def test_a_long_stream_paused_twice_is_one_answer(
    vllm_serial: VllmServer, start_gateway: GatewayFactory
) -> None:
    async with (
        start_gateway(vllm_serial, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as c,
    ):
        await label(c)  # compile the label grammar first
        body = {
            "model": "batch", "messages": WRITE, "max_tokens": TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        chunks: list[dict[str, object]] = []
        ends = []
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    assert not ends, "a chunk after [DONE]"
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) in (20, 120):  # well into the answer: take its slot
                        await label(c)
                elif line:
                    ends.append(line)
        assert ends == ["data: [DONE]"]
        assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}  # one stream
        deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]  # type: ignore[index]
        assert sum("role" in d for d in deltas) == 1
        assert "error" not in json.dumps(chunks)
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens"] == TOKENS, usage  # type: ignore[index]
        assert await metric(c, 'gateway_preemptions_total{priority_class="batch"}') >= 2
        assert await metric(c, 'gateway_resumed_tokens_total{priority_class="batch"}') >= 20


async def test_a_long_non_streamed_answer_paused_twice_arrives_whole(
    vllm_serial: VllmServer, start_gateway: GatewayFactory
) -> None:
    async with (
        start_gateway(vllm_serial, window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as c,
    ):
        await label(c)
        body = {"model": "batch", "messages": WRITE, "max_tokens": TOKENS, "temperature": 0}
        batch = asyncio.create_task(c.post("/v1/chat/completions", json=body))
        async with asyncio.timeout(60):
            while await metric(c, 'gateway_inflight_requests{upstream="') < 1:
                await asyncio.sleep(0.05)
        for _ in range(2):
            await label(c)
        r = await batch
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == TOKENS
        assert await metric(c, 'gateway_preemptions_total{priority_class="batch"}') >= 2
