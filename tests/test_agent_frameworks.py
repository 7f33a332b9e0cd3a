"""The agent frameworks people use, unchanged, against the server (tiny random model).

The model is random, so each test forces the decisions it needs with ``tool_choice`` (a named
function or ``required``): the server turns those into grammar-constrained decoding, the model's
output is a valid call, and the framework runs its real loop on it (function tools, handoffs,
structured output). Nothing here is Tokencake-specific but the base URL.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel

pytest.importorskip("tokencake.structured")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not go online

MODEL = "tiny-llama"
CITY = {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}


class Weather(BaseModel):
    """The weather answer."""

    city: Literal["Paris", "Oslo", "Lima"]
    sunny: bool


def url(agent_served) -> str:
    return agent_served[0].url + "/v1"


# ---------------------------------------------------------------- OpenAI Agents SDK
def _triage(model, calls: list[str]):
    from agents import Agent, ModelSettings, function_tool

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Lima"]) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    weather = Agent(
        name="weather_agent",
        instructions="Answer weather questions with get_weather.",
        tools=[get_weather],
        # A random model never says EOS in free text (a Responses turn cut by max tokens is
        # "incomplete", which the SDK raises on): the tool's answer is the final output.
        tool_use_behavior="stop_on_first_tool",
        model=model,
        model_settings=ModelSettings(tool_choice="required", max_tokens=96),
    )
    triage = Agent(
        name="triage_agent",
        instructions="Hand weather questions to the weather agent.",
        handoffs=[weather],
        model=model,
        model_settings=ModelSettings(tool_choice="transfer_to_weather_agent", max_tokens=96),
    )
    return triage


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_agents_sdk_handoff_and_function_tool(agent_served, api):
    from agents import (
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=url(agent_served), api_key="unused", max_retries=0)
    cls = OpenAIChatCompletionsModel if api == "chat_completions" else OpenAIResponsesModel
    calls: list[str] = []

    async def run():
        result = await Runner.run(_triage(cls(model=MODEL, openai_client=client), calls), "Weather in Oslo?", max_turns=6)  # fmt: skip
        streamed = Runner.run_streamed(_triage(cls(model=MODEL, openai_client=client), calls), "And Lima?", max_turns=6)  # fmt: skip
        kinds = [e.type async for e in streamed.stream_events()]
        return result, streamed, kinds

    result, streamed, kinds = asyncio.run(run())
    for r in (result, streamed):
        assert r.last_agent.name == "weather_agent"  # the handoff happened
        items = [i.type for i in r.new_items]
        assert "handoff_output_item" in items and "tool_call_output_item" in items
        assert r.final_output.startswith("sunny in ")
    assert len(calls) == 2 and set(calls) <= {"Paris", "Oslo", "Lima"}
    assert "raw_response_event" in kinds and "agent_updated_stream_event" in kinds


def test_agents_sdk_default_model_is_the_responses_api(agent_served):
    from agents import Agent, ModelSettings, Runner, set_default_openai_client, set_tracing_disabled
    from agents.models import openai_provider
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=url(agent_served), api_key="unused", max_retries=0), use_for_tracing=False)  # fmt: skip
    agent = Agent(name="a", instructions="Report the weather.", model=MODEL, output_type=Weather, model_settings=ModelSettings(max_tokens=64))  # fmt: skip
    model = openai_provider.OpenAIProvider().get_model(MODEL)
    assert type(model).__name__ == "OpenAIResponsesModel"
    result = asyncio.run(Runner.run(agent, "Weather in Paris?"))
    assert isinstance(result.final_output, Weather)


def test_agents_sdk_structured_output_type(agent_served):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=url(agent_served), api_key="unused", max_retries=0)
    agent = Agent(
        name="w",
        instructions="Report the weather.",
        output_type=Weather,
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(max_tokens=64),
    )
    out = asyncio.run(Runner.run(agent, "Weather in Paris?")).final_output
    assert isinstance(out, Weather)


# ---------------------------------------------------------------- LangChain
@pytest.mark.parametrize("responses_api", [False, True])
def test_langchain_bind_tools(agent_served, responses_api):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["Paris", "Oslo", "Lima"]) -> str:
        """Current weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(model=MODEL, base_url=url(agent_served), api_key="unused", max_tokens=96, max_retries=0, use_responses_api=responses_api)  # fmt: skip
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    msg = bound.invoke("Weather in Lima?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"]["city"] in ("Paris", "Oslo", "Lima")
    # the tool loop: run it, send the result back, get an answer
    result = get_weather.invoke(msg.tool_calls[0])
    assert isinstance(result, ToolMessage)
    answer = llm.bind_tools([get_weather]).invoke([HumanMessage("Weather in Lima?"), msg, result])
    assert isinstance(answer.content, (str, list)) and not answer.tool_calls
    # streaming: the chunks add up to the same kind of call
    chunks = list(bound.stream("Weather in Oslo?"))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.tool_calls[0]["name"] == "get_weather"


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(agent_served, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=url(agent_served), api_key="unused", max_tokens=128, max_retries=0)  # fmt: skip
    if method == "json_mode":  # json_mode promises a JSON object, not a schema
        out = llm.with_structured_output(Weather.model_json_schema(), method=method).invoke("Weather as JSON")  # fmt: skip
        assert isinstance(out, dict)
        return
    out = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
    assert isinstance(out, Weather)


# ---------------------------------------------------------------- litellm
def test_litellm_tools(agent_served):
    import litellm

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": CITY}, "required": ["city"]}}}]  # fmt: skip
    kw = dict(model=f"openai/{MODEL}", api_base=url(agent_served), api_key="unused", max_tokens=96)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = litellm.completion(messages=messages, tools=tools, tool_choice="required", **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tools[0]["function"]["parameters"])
    # streamed
    chunks = list(litellm.completion(messages=messages, tools=tools, tool_choice="required", stream=True, **kw))  # fmt: skip
    built = litellm.stream_chunk_builder(chunks, messages=messages)
    args = built.choices[0].message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(args), tools[0]["function"]["parameters"])
    # the result goes back; the model answers in text
    follow = litellm.completion(
        messages=messages + [r.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
        tools=tools, **kw,
    )  # fmt: skip
    assert follow.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- the examples, unchanged
@pytest.mark.slow  # subprocesses importing the frameworks; the flows are covered above
@pytest.mark.parametrize(
    "script, expect",
    [
        ("agents_triage.py", ["[triage_agent] handoff_output_item", "final answer from weather_agent:"]),
        ("agents_triage.py --api chat_completions", ["[weather_agent] tool_call_output_item"]),
        ("langchain_tools.py", ["tool get_weather(", "structured: city="]),
    ],
)  # fmt: skip
def test_examples_run_against_the_server(agent_served, script, expect):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name, *args = script.split()
    env = {**os.environ, "OPENAI_BASE_URL": url(agent_served)}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / name), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in expect:
        assert line in proc.stdout, proc.stdout
