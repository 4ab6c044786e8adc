"""The Responses API: a Responses body as the chat body it runs as, a chat answer as the
Response object, and refusals (400 in OpenAI's envelope) for what cannot map.

The Response objects are validated with the installed ``openai`` SDK's own pydantic model
(strictly, not the lenient construction the SDK uses for parsing), so a field of the wrong
shape fails here before a client sees it. The app tests with real clients are in
``test_responses_app.py``; the streamed form in ``test_response_stream.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response

from gateway.errors import BadRequest
from gateway.protocol import parse_request
from gateway.responses import ResponseShape

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
    plain = ResponseShape.parse({"model": "chat", "input": "x", "tools": [], "tool_choice": "auto"})
    assert "tools" not in plain.chat_body
    assert "response_format" not in plain.chat_body


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
    assert response.model == "chat"  # the task, not vLLM's model id
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
