"""The Responses API: a Responses body as the chat body it runs as, a chat answer as the
Response object, and refusals (400 in OpenAI's envelope) for what cannot map.

The Response objects are validated with the installed ``openai`` SDK's own pydantic model
(strictly, not the lenient construction the SDK uses for parsing), so a field of the wrong
shape fails here before a client sees it. Then the endpoint, in front of the fake vLLM, with
the real clients: the ``openai`` SDK (``responses.create``, streamed and not, and
``responses.stream``) and the OpenAI Agents SDK's default model. The streamed form's details
are in ``test_response_stream.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from openai.types.responses import Response

from gateway.auth import hash_key
from gateway.errors import BadRequest
from gateway.protocol import parse_request
from gateway.responses import ResponseShape
from tests.fake_vllm import FakeVllm
from tests.support import assert_envelope
from tests.unit.conftest import GatewayFactory

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def chat_answer(
    content: str | None = "Hello",
    *,
    calls: list[dict[str, Any]] | None = None,
    finish: str = "stop",
    **extra: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "tiny-qwen2",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        **extra,
    }


def refused(body: dict[str, Any], code: str = "unsupported_parameter") -> BadRequest:
    with pytest.raises(BadRequest) as info:
        ResponseShape.parse({"model": "chat", **body})
    assert info.value.code == code, info.value.message
    assert info.value.status == 400
    return info.value


# -- request side -------------------------------------------------------------------------


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    shape = ResponseShape.parse(
        {
            "model": "chat",
            "input": "Hi",
            "instructions": "Be brief.",
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "logit_bias": {"11": -100},  # vLLM's knobs pass as on chat
            "user": "u-1",
            "store": True,
            "metadata": {"k": "v"},
            "reasoning": {"effort": "low"},
            "include": ["reasoning.encrypted_content"],
            "truncation": "auto",
            "service_tier": "auto",
        }
    )
    assert shape.chat_body == {
        "model": "chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stream": False,
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "logit_bias": {"11": -100},
    }
    request = parse_request("chat", shape.chat_body)  # the chat path takes it as it is
    assert request.max_tokens == 50
    assert request.sampling["logit_bias"] == {"11": -100.0}


def test_a_stream_asks_the_chat_stream_for_usage() -> None:
    shape = ResponseShape.parse({"model": "chat", "input": "Hi", "stream": True})
    request = parse_request("chat", shape.chat_body)
    assert request.stream
    assert request.include_usage  # response.completed carries the usage


def test_input_items_become_the_chat_conversation() -> None:
    shape = ResponseShape.parse(
        {
            "model": "chat",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Weather"},
                        {"type": "input_text", "text": "in Paris?"},
                    ],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
                },
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                    "status": "completed",
                },
                {
                    "type": "function_call",
                    "call_id": "call_2",
                    "name": "get_weather",
                    "arguments": '{"city":"Rome"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "25 C"}],
                },
            ],
        }
    )
    messages = parse_request("chat", shape.chat_body).messages
    assert messages == [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather\nin Paris?"},  # parts joined as chat joins them
        {
            "role": "assistant",
            "content": "Let me look.",
            # calls of one turn (text, then two parallel calls) are one assistant message
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25 C"},
    ]


def test_a_call_after_a_user_message_opens_an_assistant_turn() -> None:
    shape = ResponseShape.parse(
        {
            "model": "chat",
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "function_call", "call_id": "c", "name": "w", "arguments": "{}"},
            ],
        }
    )
    assert shape.chat_body["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "w", "arguments": "{}"}}
        ],
    }


def test_function_tools_tool_choice_and_text_format_map_to_chat() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    shape = ResponseShape.parse(
        {
            "model": "chat",
            "input": "x",
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "text": {
                "format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}
            },
        }
    )
    body = shape.chat_body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema, "strict": True},
    }
    sampling = parse_request("chat", body).sampling  # and chat's own checks pass
    assert sampling["tool_choice"] == body["tool_choice"]
    json_object = ResponseShape.parse(
        {"model": "chat", "input": "x", "text": {"format": {"type": "json_object"}}}
    )
    assert json_object.chat_body["response_format"] == {"type": "json_object"}
    # No tools: "auto" and parallel_tool_calls change nothing, so a task without tools takes
    # them; "required" still needs tools (the chat path says so).
    plain = ResponseShape.parse(
        {
            "model": "summarize",
            "input": "x",
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
        }
    )
    assert parse_request("chat", plain.chat_body).sampling == {}
    required = ResponseShape.parse({"model": "chat", "input": "x", "tool_choice": "required"})
    with pytest.raises(BadRequest, match="tool_choice needs tools"):
        parse_request("chat", required.chat_body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ],
)
def test_what_needs_state_or_features_the_gateway_lacks_is_refused(
    body: dict[str, Any], param: str
) -> None:
    error = refused({"input": "hi", **body})
    assert error.param == param


def test_previous_response_id_says_to_send_the_whole_input() -> None:
    error = refused({"input": "and then?", "previous_response_id": "resp_abc"})
    assert "keeps no conversation state" in error.message
    assert "whole conversation in input" in error.message
    assert error.envelope()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({}, "missing_required_parameter", "input"),
        ({"input": 42}, "invalid_type", "input"),
        ({"input": []}, "invalid_value", "input"),
        ({"input": ["hi"]}, "invalid_type", "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "invalid_value", "input[0].role"),
        ({"input": [{"role": "user", "content": 5}]}, "invalid_type", "input[0].content"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
                ]
            },
            "invalid_value",
            "input[0].content[0]",
        ),
        (
            {"input": [{"type": "function_call", "name": "w", "arguments": "{}"}]},
            "invalid_type",
            "input[0].call_id",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": 7}]},
            "invalid_type",
            "input[0].output.content",
        ),
        ({"input": [{"role": "system", "content": "only instructions"}]}, "invalid_value", "input"),
        ({"input": "hi", "max_output_tokens": 0}, "invalid_value", "max_output_tokens"),
        ({"input": "hi", "max_output_tokens": "9"}, "invalid_type", "max_output_tokens"),
        ({"input": "hi", "metadata": ["k"]}, "invalid_type", "metadata"),
        ({"input": "hi", "truncation": "middle"}, "invalid_value", "truncation"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "invalid_value", "text.format"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "A"}}},
            "invalid_type",
            "text.format.schema",
        ),
        ({"input": "hi", "tools": [{"type": "function"}]}, "invalid_type", "tools[0].name"),
        ({"input": "hi", "tools": {"type": "function"}}, "invalid_type", "tools"),
        ({"input": "hi", "include": "all"}, "invalid_type", "include"),
        ({"input": "hi", "reasoning": "high"}, "invalid_type", "reasoning"),
        ({"input": "hi", "stream": "yes"}, "invalid_type", "stream"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(body: dict[str, Any], code: str, param: str) -> None:
    error = refused(body, code)
    assert error.param == param
    assert set(error.envelope()["error"]) == {"message", "type", "param", "code"}


# -- response side ------------------------------------------------------------------------


def shape_for(**body: Any) -> ResponseShape:
    shape = ResponseShape.parse({"model": "chat", "input": "hi", **body})
    shape.model = "chat"
    return shape


def test_a_text_answer_is_a_completed_response_with_one_message() -> None:
    shape = shape_for(instructions="Be brief.", metadata={"k": "v"}, temperature=0.3)
    body = shape.response(chat_answer("Hello there"))
    response = Response.model_validate(body, strict=True)
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "tiny-qwen2"  # the served model, as on chat completions
    assert response.output_text == "Hello there"
    (item,) = response.output
    assert item.type == "message"
    assert item.id.startswith("msg_")
    assert item.status == "completed"
    assert body["output"][0]["content"][0]["annotations"] == []
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (11, 3)
    assert response.usage.total_tokens == 14
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    # the request's fields come back, as OpenAI echoes them
    assert response.instructions == "Be brief."
    assert response.metadata == {"k": "v"}
    assert response.temperature == 0.3
    assert response.tool_choice == "auto"
    assert response.tools == []
    assert response.parallel_tool_calls is True
    assert body["store"] is False  # the gateway stores nothing


def test_tool_calls_are_function_call_items_with_the_chat_call_id() -> None:
    calls = [
        {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "chatcmpl-tool-2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
    ]  # fmt: skip
    shape = shape_for(tools=[WEATHER], tool_choice="required")
    body = shape.response(chat_answer(None, calls=calls, finish="tool_calls"))
    response = Response.model_validate(body, strict=True)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["function_call", "function_call"]
    first = response.output[0]
    assert first.type == "function_call"
    assert first.call_id == "chatcmpl-tool-1"
    assert first.name == "get_weather"
    assert first.arguments == '{"city":"Paris"}'
    assert first.id is not None
    assert first.id.startswith("fc_")
    assert first.status == "completed"
    assert response.tools[0].type == "function"  # echoed in Responses' flat form
    assert response.tool_choice == "required"
    with_text = shape.response(chat_answer("Checking.", calls=calls[:1], finish="tool_calls"))
    assert [item["type"] for item in with_text["output"]] == ["message", "function_call"]


def test_a_length_finish_is_incomplete_at_max_output_tokens() -> None:
    body = shape_for(max_output_tokens=3).response(chat_answer("one two three", finish="length"))
    response = Response.model_validate(body, strict=True)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 3
    assert response.output[0].status == "incomplete"


def test_an_empty_answer_is_still_one_message_and_a_label_carries_over() -> None:
    body = shape_for().response(chat_answer("", sentiment="positive"))
    response = Response.model_validate(body, strict=True)
    assert response.output_text == ""
    assert len(response.output) == 1
    assert body["sentiment"] == "positive"  # assist's label, as on chat


# -- the endpoint, with real clients ------------------------------------------------------


@pytest.fixture
async def sdk(gateway: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{gateway}/v1", api_key="none", max_retries=0) as c:
        yield c


def sse_events(text: str) -> list[dict[str, Any]]:
    """A Responses stream's events as sent: ``event:`` and ``data:`` lines, no ``[DONE]``."""
    out = []
    for block in text.split("\n\n"):
        if block:
            head, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert head == f"event: {event['type']}"
            out.append(event)
    return out


async def test_the_sdk_gets_a_response_from_the_chat_path(sdk: AsyncOpenAI, fake: FakeVllm) -> None:
    raw = await sdk.responses.with_raw_response.create(
        model="chat", input="Hi", instructions="Be brief.", max_output_tokens=40
    )
    response = raw.parse()
    assert response.output_text == "Hello there friend"
    assert response.status == "completed"
    assert response.model == fake.model  # what chat completions say, too
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    # The same chat request the chat endpoint would send: the task's prompt first and
    # authoritative, the instructions as context, its class's priority, max_tokens.
    sent = fake.seen[-1].body
    assert sent["messages"][0]["role"] == "system"
    assert sent["messages"][0]["content"].endswith("Be brief.")
    assert sent["messages"][1:] == [{"role": "user", "content": "Hi"}]
    assert sent["max_tokens"] == 40
    assert sent["priority"] == -90  # chat is interactive
    assert raw.headers["x-task"] == "chat"
    assert raw.headers["x-request-id"]
    assert "total;dur=" in raw.headers["server-timing"]


async def test_the_sdk_streams_a_response(
    sdk: AsyncOpenAI, client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    stream = await sdk.responses.create(model="chat", input="Hi", stream=True)
    kinds, deltas = [], []
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "".join(deltas) == "Hello there friend"
    async with sdk.responses.stream(model="chat", input="Hi") as helper:
        final = await helper.get_final_response()  # the SDK's helper checks ids and indices
    assert final.output_text == "Hello there friend"
    assert final.usage is not None
    assert final.usage.input_tokens == 7
    r = await client.post("/v1/responses", json={"model": "chat", "input": "Hi", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text  # Responses streams just end
    assert sse_events(r.text)[-1]["type"] == "response.completed"


WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


async def test_a_tool_call_comes_back_as_a_function_call_item(
    sdk: AsyncOpenAI, fake: FakeVllm
) -> None:
    fake.behaviour.tool_call = ("get_weather", '{"city": "Paris"}')
    response = await sdk.responses.create(
        model="chat", input="Weather?", tools=[WEATHER_TOOL], tool_choice="required"
    )
    (call,) = response.output
    assert call.type == "function_call"
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.call_id == "chatcmpl-tool-fake"
    sent = fake.seen[-1].body
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": WEATHER_TOOL["parameters"]},
        }
    ]
    assert sent["tool_choice"] == "required"
    async with sdk.responses.stream(model="chat", input="Weather?", tools=[WEATHER_TOOL]) as s:
        final = await s.get_final_response()
    assert [(o.type, getattr(o, "arguments", None)) for o in final.output] == [
        ("function_call", '{"city": "Paris"}')
    ]
    # The result goes back as input items; the conversation reaches vLLM as chat messages.
    after = await sdk.responses.create(
        model="chat",
        tools=[WEATHER_TOOL],
        input=[
            {"role": "user", "content": "Weather?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"},
        ],
    )
    assert after.output_text == "Hello there friend"
    assert fake.seen[-1].body["messages"][-2:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "21 C"},
    ]


async def test_max_output_tokens_reached_is_an_incomplete_response(
    sdk: AsyncOpenAI, client: httpx.AsyncClient
) -> None:
    response = await sdk.responses.create(model="chat", input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Hello there"
    r = await client.post(
        "/v1/responses",
        json={"model": "chat", "input": "Hi", "stream": True, "max_output_tokens": 2},
    )
    assert sse_events(r.text)[-1]["type"] == "response.incomplete"


async def test_refusals_and_unknown_tasks_are_errors_in_the_envelope(
    sdk: AsyncOpenAI, client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.responses.create(model="chat", input="more", previous_response_id="resp_1")
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.create(model="gpt-4o", input="Hi")
    with pytest.raises(openai.BadRequestError) as info:  # a label task takes no tools
        await sdk.responses.create(model="sentiment", input="Hi", tools=[WEATHER_TOOL])
    assert info.value.code == "unsupported_parameter"
    assert_envelope(await client.post("/v1/responses", content=b"{"), 400, "invalid_json")
    assert_envelope(await client.post("/v1/responses", json={"model": "chat"}), 400)
    stream = {"model": "chat", "input": [{"type": "item_reference", "id": "x"}], "stream": True}
    assert_envelope(await client.post("/v1/responses", json=stream), 400)  # before any event
    assert len(fake.seen) == 0  # none of these reached vLLM


async def test_label_and_two_step_tasks_answer_through_responses(
    sdk: AsyncOpenAI, client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    label = await sdk.responses.create(model="sentiment", input="I love it")
    assert label.output_text == "positive"
    assert fake.seen[-1].body["structured_outputs"] == {"choice": ["positive", "negative"]}
    raw = await sdk.responses.with_raw_response.create(model="assist", input="I love it")
    reply = raw.parse()
    assert raw.headers["x-sentiment"] == "positive"
    assert reply.model == fake.model
    assert reply.output_text == "Hello there friend"
    assert reply.model_extra is not None
    assert reply.model_extra["sentiment"] == "positive"
    r = await client.post(
        "/v1/responses", json={"model": "assist", "input": "I love it", "stream": True}
    )
    events = sse_events(r.text)
    assert events[0]["response"]["sentiment"] == "positive"
    assert events[-1]["type"] == "response.completed"


async def test_x_task_x_priority_and_key_ceilings_apply_as_on_chat(
    start_gateway: GatewayFactory, fake: FakeVllm, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f"""
[tenants.limited]
keys = ["{hash_key("sk-limited")}"]
tasks = ["chat"]
max_class = "standard"
"""
    )
    async with start_gateway(keys_path=keys) as url, httpx.AsyncClient(base_url=url) as c:
        auth = {"Authorization": "Bearer sk-limited"}
        body = {"model": "gpt-4o", "input": "Hi"}
        r = await c.post("/v1/responses", json=body, headers={**auth, "X-Task": "chat"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == fake.model  # not the alias it was asked for
        assert r.headers["x-priority-class"] == "standard"  # chat is interactive; the key caps it
        assert fake.seen[-1].body["priority"] == -80
        r = await c.post(
            "/v1/responses", json=body, headers={**auth, "X-Task": "chat", "X-Priority": "batch"}
        )
        assert r.headers["x-priority-class"] == "batch"
        assert fake.seen[-1].body["priority"] == -10
        forbidden = await c.post(
            "/v1/responses", json={"model": "sentiment", "input": "x"}, headers=auth
        )
        assert_envelope(forbidden, 403, "task_not_allowed")
        assert_envelope(await c.post("/v1/responses", json=body), 401)


async def test_a_stream_the_upstream_breaks_ends_with_response_failed(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    fake.behaviour.break_after_chunks = 1
    r = await client.post("/v1/responses", json={"model": "chat", "input": "Hi", "stream": True})
    assert r.status_code == 200  # the stream had started
    events = sse_events(r.text)
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["message"].startswith("the upstream broke off the stream")
    (partial,) = events[-1]["response"]["output"]  # what had been sent, kept
    assert partial["status"] == "incomplete"
    assert partial["content"][0]["text"] == "Hello"
    assert "[DONE]" not in r.text


@pytest.mark.parametrize("streamed", [False, True])
async def test_an_openai_agent_with_a_function_tool_runs_on_the_default_model(
    gateway: str, fake: FakeVllm, streamed: bool
) -> None:
    set_tracing_disabled(True)  # the SDK would send traces to OpenAI
    fake.behaviour.tool_call = ("weather", '{"city": "Paris"}')
    asked: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"21 C in {city}"

    async with AsyncOpenAI(base_url=f"{gateway}/v1", api_key="none", max_retries=0) as c:
        agent = Agent(
            name="forecaster",
            instructions="Answer with the weather tool.",
            tools=[weather],
            model=OpenAIResponsesModel(model="chat", openai_client=c),
            model_settings=ModelSettings(tool_choice="required", max_tokens=64),
        )
        if streamed:
            run = Runner.run_streamed(agent, "Weather in Paris?", max_turns=4)
            kinds = [event.type async for event in run.stream_events()]
            assert "raw_response_event" in kinds
            final = run.final_output
        else:
            final = (await Runner.run(agent, "Weather in Paris?", max_turns=4)).final_output
    assert asked == ["Paris"]
    assert final == "Hello there friend"
    # Its second turn sent the call and its result back as input items, and the tool's
    # output reached vLLM as a tool message.
    assert fake.seen[-1].body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "chatcmpl-tool-fake",
        "content": "21 C in Paris",
    }
