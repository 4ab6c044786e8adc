"""Preempt and resume through the gateway, in front of the fake vLLM (which continues a
partial answer as vLLM does with ``continue_final_message``): a batch request whose slot
is taken by a realtime one is paused and later resumed, and its client sees one answer."""

from __future__ import annotations

import asyncio
import json

import httpx

from gateway.classes import DEFAULT_POLICIES, ClassTable
from gateway.config import load_config
from gateway.protocol import ClientRequest
from gateway.resume import Progress, continuation, resumable
from gateway.steps import Budget, Step
from tests.fake_vllm import FakeVllm
from tests.support import metric, until
from tests.unit.conftest import GatewayFactory

REPLY = " ".join(f"w{i}" for i in range(30))
BATCH = {"model": "batch", "messages": [{"role": "user", "content": "write"}]}
SENTIMENT = {"model": "sentiment", "messages": [{"role": "user", "content": "great"}]}


def chunks(text: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_paused_stream_resumes_without_a_seam(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.reply = REPLY
    fake.behaviour.chunk_delay_s = 0.03
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        async with c.stream("POST", "/v1/chat/completions", json={**BATCH, "stream": True}) as r:
            lines = r.aiter_lines()
            received = []
            while len(received) < 5:  # the batch stream is well under way
                line = await anext(lines)
                if line:
                    received.append(line)
            label = await c.post("/v1/chat/completions", json=SENTIMENT)
            assert label.status_code == 200
            received += [line async for line in lines if line]
        body = "\n".join(received)
        assert body.endswith("data: [DONE]")
        assert body.count("[DONE]") == 1
        parts = chunks(body)
        assert {p["id"] for p in parts} == {"chatcmpl-fake"}
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts)  # type: ignore[index]
        assert text == REPLY  # nothing repeated, nothing missing
        roles = [p for p in parts if "role" in p["choices"][0]["delta"]]  # type: ignore[index]
        assert len(roles) == 1
        continued = [s for s in fake.seen if s.body.get("continue_final_message")]
        assert len(continued) == 1
        assert continued[0].body["messages"][-1]["role"] == "assistant"
        assert await metric(c, 'gateway_preemptions_total{priority_class="batch"}') == 1
        assert await metric(c, 'gateway_resumed_tokens_total{priority_class="batch"}') >= 4
        assert await metric(c, 'gateway_inflight_requests{upstream="') == 0


async def test_a_paused_non_streaming_answer_arrives_whole(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    fake.behaviour.reply = REPLY
    fake.behaviour.chunk_delay_s = 0.03
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        batch = asyncio.create_task(c.post("/v1/chat/completions", json=BATCH))
        await until(lambda: fake.words_sent >= 4)  # well under way: then preempt it
        assert (await c.post("/v1/chat/completions", json=SENTIMENT)).status_code == 200
        answer = (await batch).json()
        assert answer["choices"][0]["message"]["content"] == REPLY
        assert answer["usage"]["completion_tokens"] == 30
        assert answer["usage"]["prompt_tokens"] == 7
        assert answer["usage"]["total_tokens"] == 37
        assert len([s for s in fake.seen if s.body.get("continue_final_message")]) == 1


async def test_usage_counts_the_original_prompt_when_the_answer_reads_back_differently(
    start_gateway: GatewayFactory, fake: FakeVllm
) -> None:
    # Found on the real tiny model: its random output, read back as a prompt, took fewer
    # tokens than it was generated in, so a resumed answer reported prompt_tokens 0..22 for
    # a 17-token prompt and a total_tokens that was not prompt + completion.
    fake.behaviour.reply = REPLY
    fake.behaviour.chunk_delay_s = 0.03
    fake.behaviour.reread_tokens_per_word = 0.25
    async with start_gateway(window=1) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        streamed = {**BATCH, "stream": True, "stream_options": {"include_usage": True}}
        for body in (BATCH, streamed):
            before = fake.words_sent
            batch = asyncio.create_task(c.post("/v1/chat/completions", json=body))
            await until(lambda b=before: fake.words_sent >= b + 8)  # type: ignore[misc]
            assert (await c.post("/v1/chat/completions", json=SENTIMENT)).status_code == 200
            r = await batch
            usage = r.json()["usage"] if body is BATCH else chunks(r.text)[-1]["usage"]
            assert usage == {"prompt_tokens": 7, "completion_tokens": 30, "total_tokens": 37}


def step(task: str, **sampling: object) -> Step:
    config = load_config()
    t = config.tasks[task]
    request = ClientRequest("chat", task, messages=[{"role": "user", "content": "x"}])
    request.sampling = dict(sampling)
    return Step(t, config.classes[t.priority_class], request, Budget(1.0, 1.0))


def test_what_may_be_paused() -> None:
    assert resumable(step("batch"))
    assert not resumable(step("chat"))  # interactive: max_preemptions 0
    assert not resumable(step("sentiment"))  # a label task
    assert not resumable(step("batch", response_format={"type": "json_object"}))
    assert not resumable(step("batch", tools=[]))


def test_a_chat_continuation_ends_with_the_partial_answer() -> None:
    resumed, extra = continuation(step("batch"), "Once upon")
    assert resumed.request.messages[-1] == {"role": "assistant", "content": "Once upon"}
    assert extra == {"continue_final_message": True, "add_generation_prompt": False}


def test_a_resumed_segment_is_rewritten_as_the_first() -> None:
    def event(obj: object) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    p = Progress(chat=True)
    first = event(
        {
            "id": "a",
            "created": 1,
            "model": "m",
            "choices": [{"delta": {"role": "assistant", "content": "Hi"}}],
        }
    )
    assert chunks(p.read(first).decode()) == chunks(first.decode())
    p.resumed()
    second = event(
        {
            "id": "b",
            "created": 2,
            "model": "m",
            "choices": [{"delta": {"role": "assistant", "content": ""}}],
        }
    )
    third = event(
        {"id": "b", "created": 2, "model": "m", "choices": [{"delta": {"content": " there"}}]}
    )
    out = p.read(second + third)
    assert [c["id"] for c in chunks(out.decode())] == ["a"]
    assert p.text == "Hi there"
    # No usage came before the pause: the re-read tokens are subtracted.
    assert p.usage({"prompt_tokens": 9, "completion_tokens": 1}) == {
        "prompt_tokens": 8,
        "completion_tokens": 2,
        "total_tokens": 10,
    }


def test_a_resumed_usage_keeps_the_first_segments_prompt() -> None:
    p = Progress(chat=True)
    first = {"choices": [{"delta": {"content": "Hi"}}], "usage": {"prompt_tokens": 5}}
    first["usage"]["completion_tokens"] = 3  # type: ignore[index]
    p.read(b"data: " + json.dumps(first).encode() + b"\n\n")
    p.resumed()
    assert p.usage({"prompt_tokens": 6, "completion_tokens": 4}) == {
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "total_tokens": 12,
    }
    assert ClassTable(DEFAULT_POLICIES)["batch"].max_preemptions > 0
