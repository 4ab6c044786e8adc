"""Function calling through the gateway on a real vLLM (CPU build, tiny model), with the
clients agents use: the OpenAI SDK, LangChain's ChatOpenAI and the OpenAI Agents SDK.

The tiny model's weights are random, so what it says is noise; but ``tool_choice="required"``
(with ``parallel_tool_calls: false``) or a named tool makes vLLM constrain the output to the
call's envelope, and a tool marked ``strict`` to its arguments' JSON schema, so a call comes
back well formed. One more thing is needed on random weights: the JSON grammar allows
whitespace anywhere, and this model, given the choice, writes whitespace until max_tokens (it
did, every time). The tests ban whitespace tokens with ``logit_bias`` (forwarded by the
gateway like any client's). What is checked: that the fields reach vLLM (started with
``--enable-auto-tool-choice --tool-call-parser hermes`` by launch/vllm.sh) and that the calls
come back as OpenAI's clients read them, streamed and not. Whether a real model picks the
right tool is the e2e tier's question.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from langchain_core.messages import AIMessageChunk, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tests.integration.conftest import GatewayFactory
from tests.vllm_server import VllmServer

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def no_whitespace(model: str) -> dict[str, int]:
    """A logit_bias that bans the tokens that are only whitespace (byte-level BPE writes a
    space as Ġ, a newline as Ċ, a tab as ĉ, a carriage return as č)."""
    vocab = json.loads((Path(model) / "tokenizer.json").read_text())["model"]["vocab"]
    return {str(i): -100 for t, i in vocab.items() if t and set(t) <= set("ĠĊĉč")}


@pytest.fixture
def bias(vllm: VllmServer) -> dict[str, int]:
    return no_whitespace(vllm.model)


@pytest.fixture
async def client(vllm: VllmServer, start_gateway: GatewayFactory) -> AsyncIterator[AsyncOpenAI]:
    async with (
        start_gateway(vllm) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as c,
    ):
        yield c


def arguments(text: str) -> dict[str, Any]:
    """A call's arguments as a dict: the first JSON object in them. On random weights vLLM's
    streamed extraction of a required call's arguments is raw model text: it may hold a
    control character (a newline, a tab) inside the city's string, or trail text after the
    object (seen once in a fresh-clone run: "Extra data"). The gateway relays the deltas as
    they came; what is checked here is the shape (an object with a city string)."""
    args, _ = json.JSONDecoder(strict=False).raw_decode(text.lstrip())
    assert isinstance(args, dict), text
    return args


def well_formed(call: Any) -> dict[str, Any]:
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.id
    args = arguments(call.function.arguments)
    assert set(args) == {"city"}
    assert isinstance(args["city"], str)
    return args


async def test_a_required_tool_call_comes_back_whole_and_a_result_round_trips(
    client: AsyncOpenAI, bias: dict[str, int]
) -> None:
    r = await client.chat.completions.create(
        model="chat",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        logit_bias=bias,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    well_formed(call)
    # A model id, not the folder vLLM read it from.
    assert r.model == "tiny-qwen2"
    # The tool's result goes back; the model answers (noise here, but an answer).
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    after = await client.chat.completions.create(
        model="chat", messages=history, tools=[WEATHER], max_tokens=8
    )
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


async def test_a_named_tool_call_streams_as_vllm_sends_it(
    client: AsyncOpenAI, bias: dict[str, int]
) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    stream = await client.chat.completions.create(
        model="code",
        messages=ASK,
        tools=[WEATHER],
        tool_choice=named,
        max_tokens=100,
        logit_bias=bias,
        stream=True,
    )
    name, streamed, finish, ids = "", "", None, set()
    async for chunk in stream:
        ids.add(chunk.id)
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                name += delta.function.name or "" if delta.function else ""
                streamed += delta.function.arguments or "" if delta.function else ""
            finish = choice.finish_reason or finish
    assert len(ids) == 1
    assert name == "get_weather"
    assert set(arguments(streamed)) == {"city"}
    assert finish in ("tool_calls", "stop")  # vLLM ends a named call with "stop"


async def test_tools_on_a_task_that_cannot_take_them_are_a_400(client: AsyncOpenAI) -> None:
    for task in ("sentiment", "summarize"):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=task, messages=ASK, tools=[WEATHER])
        assert info.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="sentiment", messages=ASK, response_format={"type": "json_object"}
        )
    model = await client.models.retrieve("chat")
    assert model.id == "chat"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4o")


class City(BaseModel):
    city: str = Field(max_length=20)  # random weights would otherwise write on and on


@tool(args_schema=City)
def get_weather(city: str) -> str:
    """The weather in a city."""
    return json.dumps({"city": city, "temp_c": 21})


async def test_langchain_bind_tools_and_streaming(
    vllm: VllmServer, start_gateway: GatewayFactory, bias: dict[str, int]
) -> None:
    async with start_gateway(vllm) as url:
        llm = ChatOpenAI(
            model="chat",
            base_url=f"{url}/v1",
            api_key="none",
            max_tokens=100,
            max_retries=0,
            logit_bias=bias,  # type: ignore[arg-type]
        )
        bound = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True)
        message = await bound.ainvoke("What is the weather in Paris?")
        assert message.tool_calls, message
        call = message.tool_calls[0]
        assert call["name"] == "get_weather"
        assert isinstance(call["args"]["city"], str)
        # The tool's result back into the conversation, as LangChain's agents do it.
        result = await get_weather.ainvoke(call["args"])
        reply = await llm.ainvoke(
            [
                ("user", "What is the weather in Paris?"),
                message,
                ToolMessage(result, tool_call_id=call["id"]),
            ]
        )
        assert isinstance(reply.content, str)
        # Streamed, the tool call's pieces add up to the same kind of call.
        total: AIMessageChunk | None = None
        async for piece in bound.astream("And in Rome?"):
            assert isinstance(piece, AIMessageChunk)
            total = piece if total is None else total + piece
        assert total is not None
        assert total.tool_calls
        assert total.tool_calls[0]["name"] == "get_weather"


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=20)
    temp_c: int = Field(ge=-50, le=60)


async def test_langchain_with_structured_output(
    vllm: VllmServer, start_gateway: GatewayFactory, bias: dict[str, int]
) -> None:
    """LangChain's default structured output (a strict JSON schema as ``response_format``)
    and its function-calling variant both come back as the pydantic object."""
    async with start_gateway(vllm) as url:
        llm = ChatOpenAI(
            model="chat",
            base_url=f"{url}/v1",
            api_key="none",
            max_tokens=100,
            max_retries=0,
            logit_bias=bias,  # type: ignore[arg-type]
        )
        for method in ("json_schema", "function_calling"):
            structured = llm.with_structured_output(Weather, method=method, strict=True)
            weather = await structured.ainvoke("What is the weather in Paris?")
            assert isinstance(weather, Weather), (method, weather)


async def test_openai_agents_sdk_calls_a_function_tool(
    vllm: VllmServer, start_gateway: GatewayFactory, bias: dict[str, int]
) -> None:
    set_tracing_disabled(True)  # the SDK would send traces to OpenAI
    called: list[str] = []

    @function_tool
    def weather(city: Annotated[str, Field(max_length=20)]) -> str:
        """The weather in a city."""
        called.append(city)
        return f"21 C and sunny in {city}"

    async with start_gateway(vllm) as url, AsyncOpenAI(base_url=f"{url}/v1", api_key="none") as c:
        agent = Agent(
            name="forecaster",
            instructions="Answer with the weather tool.",
            tools=[weather],
            model=OpenAIChatCompletionsModel(model="chat", openai_client=c),
            # Required for the first turn; the SDK resets it to auto after a tool call, so
            # the random model then answers in text and the run ends.
            model_settings=ModelSettings(
                tool_choice="required",
                parallel_tool_calls=False,
                max_tokens=64,
                extra_body={"logit_bias": bias},
            ),
        )
        result = await Runner.run(
            agent, "What is the weather in Paris?", max_turns=4, run_config=RunConfig()
        )
    assert len(called) >= 1
    assert isinstance(result.final_output, str)
