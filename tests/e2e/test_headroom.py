"""Headroom on the default stack: sentiment stays quick while long batch work fills vLLM.

The timing claim (sentiment under 2 s with 12 long batch requests queued or running) is
measured by loadtest/headroom.py; this test checks the outcome and order: every sentiment
request is answered correctly while the batch backlog is still being worked through.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.vllm_server import VllmServer

BATCH = {
    "model": "batch",
    "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
    "max_tokens": 200,
}
SENTENCES = [
    ("I love this, it is wonderful!", "positive"),
    ("这太糟糕了，我很失望。", "negative"),
] * 3


async def test_sentiment_is_served_while_batch_work_fills_the_window(
    vllm: VllmServer, gateway: str
) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=600) as c:
        batch = [asyncio.create_task(c.post("/v1/chat/completions", json=BATCH)) for _ in range(12)]
        async with asyncio.timeout(60):
            while await asyncio.to_thread(vllm.metric, "vllm:num_requests_running") < 5:
                await asyncio.sleep(0.1)
        latencies = []
        for text, expected in SENTENCES:
            started = time.monotonic()
            r = await c.post(
                "/v1/chat/completions",
                json={"model": "sentiment", "messages": [{"role": "user", "content": text}]},
            )
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == expected
        unfinished = sum(not task.done() for task in batch)
        print(
            f"\nsentiment under 12 batch requests: {[round(x, 2) for x in latencies]} s; batch unfinished: {unfinished}"
        )
        assert unfinished >= 6  # all of them answered while the backlog was still being served
        assert all(r.status_code == 200 for r in await asyncio.gather(*batch))
