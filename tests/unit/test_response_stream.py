"""A chat stream retold as Responses events: the order OpenAI sends them in, each event
valid for the installed ``openai`` SDK's types (strictly validated), and the whole sequence
accepted by the SDK's own stream accumulator (which checks indices and ids)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, get_args

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.errors import DeadlineExceeded
from gateway.response_stream import StreamTranslator, translate
from gateway.responses import ResponseShape

EVENT = TypeAdapter(ResponseStreamEvent)
#: Each event type's SDK model, to validate an event strictly against its own type.
MODELS = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in get_args(get_args(ResponseStreamEvent)[0])
}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    data: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "tiny-qwen2",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


USAGE = chunk(usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
DONE = b"data: [DONE]\n\n"
ROLE = chunk({"role": "assistant", "content": ""})


def translator(**body: Any) -> StreamTranslator:
    shape = ResponseShape.parse({"model": "chat", "input": "hi", "stream": True, **body})
    shape.model = "chat"
    return StreamTranslator(shape)


def events(raw: bytes) -> list[dict[str, Any]]:
    """The events of a Responses stream, each checked against the SDK's types."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        head, data = block.split("\n")
        assert head.startswith("event: ")
        assert data.startswith("data: ")
        event = json.loads(data[len("data: ") :])
        assert event["type"] == head[len("event: ") :]
        MODELS[event["type"]].model_validate(event, strict=True)
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def accepted_by_the_sdk(evs: list[dict[str, Any]]) -> Any:
    """Feed the events to the SDK's stream accumulator (what ``responses.stream()`` uses);
    it raises on an index, id or order it does not accept. The final Response, if any."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    final = None
    for event in evs:
        for out in state.handle_event(EVENT.validate_python(event)):
            if out.type == "response.completed":
                final = out.response
    return final


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def test_text_streams_as_one_message_then_completed_with_usage() -> None:
    t = translator()
    raw = t.feed(ROLE + chunk({"content": "Hel"})) + t.feed(chunk({"content": "lo"}))
    raw += t.feed(chunk({"content": ""}, "stop") + USAGE + DONE)
    evs = events(raw)
    assert types(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert evs[0]["response"]["status"] == "in_progress"
    assert [e["delta"] for e in evs if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    item_id = evs[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in evs[3:8])
    assert evs[6]["text"] == "Hello"
    done = evs[-1]["response"]
    assert done["status"] == "completed"
    assert done["id"] == evs[0]["response"]["id"]
    assert done["usage"]["input_tokens"] == 9
    assert done["usage"]["output_tokens"] == 2
    assert done["output"][0]["content"][0]["text"] == "Hello"
    assert t.finished
    assert b"[DONE]" not in raw  # Responses streams just end
    final = accepted_by_the_sdk(evs)
    assert final.output_text == "Hello"


def test_tool_calls_stream_as_function_call_items() -> None:
    t = translator(tools=[{"type": "function", "name": "get_weather"}], tool_choice="required")
    first = {
        "index": 0,
        "id": "chatcmpl-tool-a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    second = {
        "index": 1,
        "id": "chatcmpl-tool-b",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":'},
    }
    raw = t.feed(ROLE + chunk({"content": "Looking."}) + chunk({"tool_calls": [first]}))
    raw += t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}))
    raw += t.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}))
    raw += t.feed(chunk({"tool_calls": [second]}))
    raw += t.feed(chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"Rome"}'}}]}))
    raw += t.feed(chunk({}, "tool_calls") + USAGE + DONE)
    evs = events(raw)
    assert types(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # the text before the calls
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # call 1
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",  # call 2
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = evs[8]
    assert added["output_index"] == 1
    assert added["item"]["type"] == "function_call"
    assert added["item"]["call_id"] == "chatcmpl-tool-a"
    assert added["item"]["name"] == "get_weather"
    assert added["item"]["status"] == "in_progress"
    assert evs[11]["arguments"] == '{"city":"Paris"}'
    assert evs[12]["item"]["status"] == "completed"
    assert evs[12]["item"]["id"] == added["item"]["id"]
    output = evs[-1]["response"]["output"]
    assert [o["type"] for o in output] == ["message", "function_call", "function_call"]
    assert [o["arguments"] for o in output[1:]] == ['{"city":"Paris"}', '{"city":"Rome"}']
    final = accepted_by_the_sdk(evs)
    assert [o.call_id for o in final.output[1:]] == ["chatcmpl-tool-a", "chatcmpl-tool-b"]


def test_a_length_finish_ends_with_response_incomplete() -> None:
    t = translator(max_output_tokens=2)
    evs = events(t.feed(ROLE + chunk({"content": "a b"}) + chunk({}, "length") + USAGE + DONE))
    assert evs[-1]["type"] == "response.incomplete"  # as OpenAI ends an incomplete response
    response = evs[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert evs[-2]["type"] == "response.output_item.done"
    assert evs[-2]["item"]["status"] == "incomplete"
    accepted_by_the_sdk(evs)


def test_an_answer_without_text_is_still_one_empty_message() -> None:
    t = translator()
    evs = events(t.feed(ROLE + chunk({}, "stop") + USAGE + DONE))
    assert types(evs)[2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert accepted_by_the_sdk(evs).output_text == ""


def test_a_bare_done_is_still_a_whole_response() -> None:
    evs = events(translator().feed(DONE))
    assert types(evs)[:2] == ["response.created", "response.in_progress"]
    assert types(evs)[-1] == "response.completed"
    accepted_by_the_sdk(evs)


def test_an_in_band_chat_error_ends_with_response_failed() -> None:
    t = translator()
    raw = t.feed(ROLE + chunk({"content": "Hel"}))
    error = {
        "message": "the deadline passed",
        "type": "timeout_error",
        "param": None,
        "code": "deadline_exceeded",
    }
    raw += t.feed(b"data: " + json.dumps({"error": error}).encode() + b"\n\n" + DONE)
    evs = events(raw)
    assert types(evs)[-2:] == ["error", "response.failed"]
    told = {k: evs[-2][k] for k in ("code", "message", "param")}
    assert told == {"code": "deadline_exceeded", "message": "the deadline passed", "param": None}
    failed = evs[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {
        "code": "server_error",
        "message": "the deadline passed",
        "type": "deadline_exceeded",
    }
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Hel"
    assert t.finished
    assert t.feed(chunk({"content": "late"}) + DONE) == b""  # nothing after the end
    accepted_by_the_sdk(evs)


def test_an_error_raised_after_the_start_is_told_once() -> None:
    t = translator()
    evs = events(t.feed(ROLE) + t.failed(DeadlineExceeded("too late", stage="upstream")))
    assert types(evs) == ["response.created", "response.in_progress", "error", "response.failed"]
    assert evs[2]["code"] == "deadline_exceeded"
    assert t.failed(DeadlineExceeded("again", stage="upstream")) == b""
    before_anything = translator()
    evs = events(before_anything.failed(DeadlineExceeded("too late", stage="upstream")))
    assert types(evs) == ["response.created", "response.in_progress", "error", "response.failed"]


def test_a_two_step_tasks_label_is_in_every_response_object() -> None:
    t = translator()
    first = chunk({"role": "assistant", "content": ""}, sentiment="positive")
    evs = events(t.feed(first + chunk({"content": "Great!"}, "stop") + DONE))
    assert evs[0]["response"]["sentiment"] == "positive"
    assert evs[-1]["response"]["sentiment"] == "positive"


async def test_translate_reads_the_chat_stream_to_its_end_and_ends_a_cut_one() -> None:
    read: list[bytes] = []

    async def chat(*batches: bytes) -> AsyncIterator[bytes]:
        for batch in batches:
            read.append(batch)
            yield batch

    error = b'data: {"error": {"message": "cut", "type": "x", "param": null, "code": "shutting_down"}}\n\n'
    out = [b async for b in translate(chat(ROLE, error, DONE), translator())]
    assert read == [ROLE, error, DONE]  # read on after the failure, so the relay finishes
    assert types(events(b"".join(out)))[-1] == "response.failed"
    cut_short = [b async for b in translate(chat(ROLE, chunk({"content": "a"})), translator())]
    evs = events(b"".join(cut_short))
    assert types(evs)[-2:] == ["error", "response.failed"]
    assert evs[-2]["code"] == "bad_upstream_response"


@pytest.mark.parametrize("batching", ["one batch", "event by event"])
def test_batches_may_split_anywhere_between_events(batching: str) -> None:
    stream = [ROLE, chunk({"content": "a"}), chunk({"content": "b"}, "stop"), USAGE, DONE]
    t = translator()
    if batching == "one batch":
        raw = t.feed(b"".join(stream))
    else:
        raw = b"".join(t.feed(event) for event in stream)
    evs = events(raw)
    assert evs[-1]["response"]["output"][0]["content"][0]["text"] == "ab"
