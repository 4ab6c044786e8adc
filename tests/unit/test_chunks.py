"""A streamed answer put back together: what vLLM would have answered without ``stream``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import sse
from gateway.chunks import Assembler, collect
from gateway.errors import BadGateway


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}],
    }


def test_a_chat_answer_with_text_logprobs_and_usage() -> None:
    a = Assembler(chat=True)
    a.add(chunk({"role": "assistant", "content": ""}))
    a.add(chunk({"content": "Hel"}, logprobs={"content": [{"token": "Hel", "logprob": -0.1}]}))
    a.add(chunk({"content": "lo"}, logprobs={"content": [{"token": "lo", "logprob": -0.2}]}))
    a.add(chunk({"content": ""}, finish="stop"))
    a.add(
        {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    )
    answer = a.answer()
    assert answer["object"] == "chat.completion"
    assert answer["id"] == "chatcmpl-1"
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "stop"
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["Hel", "lo"]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}


def test_tool_calls_are_joined_by_index() -> None:
    a = Assembler(chat=True)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    a.add(chunk({"role": "assistant", "tool_calls": [call]}))
    a.add(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}))
    a.add(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}))
    a.add(chunk({}, finish="tool_calls"))
    message = a.answer()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]


def test_a_completion_answer() -> None:
    a = Assembler(chat=False)
    for text in ("def ", "f():"):
        a.add({"id": "cmpl-1", "created": 1, "model": "m", "choices": [{"index": 0, "text": text}]})
    answer = a.answer()
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "def f():"


async def batches(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_collect_reads_batches_of_events_until_done() -> None:
    first = sse.encode(chunk({"role": "assistant", "content": "a"})) + sse.encode(
        chunk({"content": "b"})
    )
    rest = batches(sse.encode(chunk({"content": "c"}, finish="stop")) + sse.DONE)
    answer = await collect(first, rest, Assembler(chat=True))
    assert answer["choices"][0]["message"]["content"] == "abc"


@pytest.mark.parametrize(
    "tail",
    [
        b"",  # the stream ends without [DONE]
        b'data: {"error": {"message": "engine dead"}}\n\n',  # vLLM's in-band error
        b"data: not json\n\n",
    ],
)
async def test_collect_refuses_a_broken_stream(tail: bytes) -> None:
    first = sse.encode(chunk({"role": "assistant", "content": "a"}))
    with pytest.raises(BadGateway):
        await collect(first, batches(tail) if tail else batches(), Assembler(chat=True))


def test_a_batch_splits_into_its_events() -> None:
    batch = b"data: 1\n\ndata: 2\n\n" + sse.DONE
    assert list(sse.events(batch)) == [b"data: 1\n\n", b"data: 2\n\n", sse.DONE]
    assert sse.first_and_rest(batch) == (b"data: 1\n\n", b"data: 2\n\n" + sse.DONE)
    assert sse.is_done(batch)
