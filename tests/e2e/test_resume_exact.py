"""A paused and resumed answer against the uninterrupted one, on the real default model.

Greedy decoding (temperature 0): each prompt is answered once without interruption and once
paused after 16 chunks for a realtime request (the gateway's window is 1, so the realtime
request must take the batch request's slot), then resumed from its text. The resumed answer
should equal the uninterrupted one; VLLM_CPU.md measured 4 of 5 with a divergence that is
floating point (re-reading a partial answer as a prompt is not bit-identical to decoding
it), so the test requires most prompts, not all, to match, and prints where any diverged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.settings import Settings
from tests.servers import running_gateway
from tests.support import metric
from tests.vllm_server import VllmServer

PROMPTS = [
    "Explain in detail how a lighthouse works.",
    "Write a Python function that merges two sorted lists, with comments.",
    "Describe the water cycle for a ten-year-old.",
]
CUT_AT = 16


@pytest.fixture
async def one_slot(vllm: VllmServer) -> AsyncIterator[str]:
    settings = Settings(upstreams=(vllm.url,), window=1, health_interval_s=0.5, access_log=False)
    async with running_gateway(settings) as url:
        yield url


async def answer(c: httpx.AsyncClient, prompt: str, *, cut: bool) -> str:
    body = {
        "model": "batch", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 48, "temperature": 0, "seed": 1, "stream": True,
    }  # fmt: skip
    text, chunks = [], 0
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["delta"].get("content") or "")
            chunks += 1
            if cut and chunks == CUT_AT:
                label = await c.post(
                    "/v1/chat/completions",
                    json={
                        "model": "sentiment",
                        "messages": [{"role": "user", "content": "Great!"}],
                    },
                )
                assert label.status_code == 200
    return "".join(text)


async def test_resumed_answers_equal_uninterrupted_ones(one_slot: str) -> None:
    async with httpx.AsyncClient(base_url=one_slot, timeout=300) as c:
        matches, report = 0, []
        for prompt in PROMPTS:
            whole = await answer(c, prompt, cut=False)
            resumed = await answer(c, prompt, cut=True)
            if whole == resumed:
                matches += 1
            else:
                at = next(i for i, (a, b) in enumerate(zip(whole, resumed, strict=False)) if a != b)
                report.append(
                    f"diverged at character {at}: {whole[at : at + 30]!r} vs {resumed[at : at + 30]!r}"
                )
        preemptions = await metric(c, 'gateway_preemptions_total{priority_class="batch"}')
        print(f"\nresumed == uninterrupted for {matches} of {len(PROMPTS)} prompts; {report}")
        assert preemptions >= len(PROMPTS)
        assert matches >= 2, report
