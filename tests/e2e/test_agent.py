"""An agent on the real default model through the gateway: it asks for the weather, calls the
tool, reads the result and answers with it (OpenAI Agents SDK, chat-completions model)."""

from __future__ import annotations

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI


async def test_an_agent_calls_the_weather_tool_and_answers_with_its_result(gateway: str) -> None:
    set_tracing_disabled(True)  # the SDK would send traces to OpenAI
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"It is 17 degrees Celsius and raining in {city}."

    async with AsyncOpenAI(base_url=f"{gateway}/v1", api_key="none") as client:
        agent = Agent(
            name="forecaster",
            instructions="You answer questions about the weather. Use the get_weather tool.",
            tools=[get_weather],
            model=OpenAIChatCompletionsModel(model="chat", openai_client=client),
            # With tool_choice "auto" this 0.5B model answered without calling the tool (run
            # here once). "required" forces the first turn's call; the SDK then resets it to
            # auto, so the second turn reads the result and answers in text.
            model_settings=ModelSettings(temperature=0.0, max_tokens=128, tool_choice="required"),
        )
        result = await Runner.run(agent, "What is the weather in Paris right now?", max_turns=4)
    print(f"\nagent: asked {asked}, answered {result.final_output!r}")
    assert [city.lower() for city in asked] == ["paris"]
    assert "17" in result.final_output
