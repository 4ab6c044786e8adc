"""Preempt and resume on a real vLLM (CPU build, tiny model): a long batch generation,
streamed or not, is paused at least twice for realtime requests and still comes back as one
answer, with the usage of the whole answer.

The server runs one sequence at a time (``--max-num-seqs 1``) and the gateway's window is 1,
so every realtime request must take the batch request's slot.

Why the realtime requests come from their own task, one after another until two pauses are
counted, rather than at fixed points of the stream: while vLLM generates, this 2-core
machine stalls processes for seconds (a bare 0.1 s ticker in a separate process stalled for
up to 2.1 s; the test process's event loop, which runs client and gateway, for up to 5 s).
Loopback socket buffers also hold a whole answer, so a client that sends a label after its
20th chunk may be reading chunks relayed long ago, from a generation already over. With a
300-token answer and two labels at chunks 20 and 120, the batch request sometimes finished
before the second label reached the gateway. The answer was then 1500 tokens, and a
fresh-clone run still saw one stream end unpaused, and another the non-streamed answer end
before the test saw it dispatched (1500 tokens take 5.8 s alone on a warm server here);
it is now 3000 (above the batch task's 2048 cap, raised for this test), and the label task's
deadlines are loosened, since a stall can outlast its 2 s queue
deadline: what is tested here is the pause, not the deadline. (Whether a
resumed answer equals the uninterrupted one token for token is checked on the real model,
in the e2e tier: this model's random output does not survive a round trip through text.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

import httpx

from gateway.config import Config, load_config
from tests.integration.conftest import GatewayFactory
from tests.support import metric
from tests.vllm_server import VllmServer

WRITE = [{"role": "user", "content": "Write a long story."}]
SENTIMENT = {"model": "sentiment", "messages": [{"role": "user", "content": "I love it"}]}
TOKENS = 3000
PAUSES = 'gateway_preemptions_total{priority_class="batch"}'
INFLIGHT = 'gateway_inflight_requests{upstream="'
RESUMED = 'gateway_resumed_tokens_total{priority_class="batch"}'


def patient_labels() -> Config:
    config = load_config()
    sentiment = replace(config.tasks["sentiment"], queue_deadline_s=30.0, deadline_s=60.0)
    batch = replace(config.tasks["batch"], max_tokens_limit=TOKENS)
    return replace(config, tasks={**config.tasks, "sentiment": sentiment, "batch": batch})


async def label(c: httpx.AsyncClient) -> None:
    r = await c.post("/v1/chat/completions", json=SENTIMENT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("positive", "negative")


async def take_its_slot_twice(
    c: httpx.AsyncClient, batch: asyncio.Task[object], under_way: Callable[[], Awaitable[bool]]
) -> None:
    """Once the batch request is under way, send labels (each must take its slot) until it
    has been paused twice and resumed with text carried over, or it is over."""
    async with asyncio.timeout(60):
        while not await under_way():
            if batch.done():  # it never got under way: say why instead of waiting on
                raise AssertionError(f"the batch request ended unseen: {batch.result()}")
            await asyncio.sleep(0.05)
    while not batch.done() and (await metric(c, PAUSES) < 2 or await metric(c, RESUMED) < 1):
        await label(c)


async def unpaused_usage(c: httpx.AsyncClient) -> dict[str, int]:
    """The usage a resumed answer must report: the prompt as the client sent it (not the
    prompt a continuation re-read) and every generated token."""
    body = {"model": "batch", "messages": WRITE, "max_tokens": 1}
    r = await c.post("/v1/chat/completions", json=body)
    prompt = r.json()["usage"]["prompt_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": TOKENS, "total_tokens": prompt + TOKENS}


async def test_a_long_stream_paused_twice_is_one_answer(
    vllm_serial: VllmServer, start_gateway: GatewayFactory
) -> None:
    async with (
        start_gateway(vllm_serial, patient_labels(), window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as c,
    ):
        await label(c)  # compile the label grammar first
        body = {
            "model": "batch", "messages": WRITE, "max_tokens": TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        chunks: list[dict[str, object]] = []
        ends = []

        async def read() -> None:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        assert not ends, "a chunk after [DONE]"
                        chunks.append(json.loads(line[6:]))
                    elif line:
                        ends.append(line)

        reader = asyncio.create_task(read())

        async def read_20() -> bool:
            return len(chunks) >= 20

        await take_its_slot_twice(c, reader, read_20)
        await reader
        assert ends == ["data: [DONE]"]
        assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}  # one stream
        deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]  # type: ignore[index]
        assert sum("role" in d for d in deltas) == 1
        assert "error" not in json.dumps(chunks)
        usage = chunks[-1]["usage"]
        assert usage == await unpaused_usage(c), usage
        assert await metric(c, PAUSES) >= 2
        assert await metric(c, RESUMED) >= 20  # the first pause came after 20 chunks


async def test_a_long_non_streamed_answer_paused_twice_arrives_whole(
    vllm_serial: VllmServer, start_gateway: GatewayFactory
) -> None:
    async with (
        start_gateway(vllm_serial, patient_labels(), window=1) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as c,
    ):
        await label(c)
        body = {"model": "batch", "messages": WRITE, "max_tokens": TOKENS, "temperature": 0}
        batch = asyncio.create_task(c.post("/v1/chat/completions", json=body))

        async def dispatched() -> bool:
            return await metric(c, INFLIGHT) >= 1

        await take_its_slot_twice(c, batch, dispatched)
        r = await batch
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"] == await unpaused_usage(c), answer["usage"]
        assert await metric(c, PAUSES) >= 2
        assert await metric(c, RESUMED) >= 1
