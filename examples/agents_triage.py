"""A triage agent that hands weather questions to a weather agent with a function tool,
written with the OpenAI Agents SDK and nothing else: it talks to any OpenAI-compatible server.

Start the server, then run the program:

    tokencake serve --port 8000                      # the 135M default model
    python examples/agents_triage.py --base-url http://127.0.0.1:8000/v1
    python examples/agents_triage.py --api chat_completions   # instead of the Responses API

The default model is far too small to decide on its own when to hand off or call a tool, so
``--force`` (on by default) sets each agent's ``tool_choice``; the server then constrains
decoding so the call is always valid for the tool's schema. With a tool-capable checkpoint
(``tokencake serve --model path/to/Qwen2.5-7B-Instruct-Q4_K_M.gguf``) pass ``--no-force`` and
let the agents decide.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from typing import Literal

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

City = Literal["Paris", "Oslo", "Lima", "Tokyo"]


@function_tool
async def get_weather(city: City) -> str:
    """The current weather in a city."""
    await asyncio.sleep(0.5)  # a real tool takes time; the server can offload KV meanwhile
    return f"{random.choice(['sunny', 'rainy', 'windy'])}, {random.randint(5, 30)} C in {city}"


def build(model, force: bool) -> Agent:
    weather = Agent(
        name="weather_agent",
        handoff_description="Answers questions about the weather.",
        instructions="Answer weather questions. Always look the weather up with get_weather.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(tool_choice="required" if force else None, max_tokens=128),
        # A small model's free text may ramble: the tool's answer is the final output.
        tool_use_behavior="stop_on_first_tool" if force else "run_llm_again",
    )
    return Agent(
        name="triage_agent",
        instructions="Route the user to the right specialist agent.",
        handoffs=[weather],
        model=model,
        model_settings=ModelSettings(
            tool_choice="transfer_to_weather_agent" if force else None, max_tokens=128
        ),
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))  # fmt: skip
    ap.add_argument("--model", default=None, help="model name (default: the server's only model)")
    ap.add_argument("--api", choices=["responses", "chat_completions"], default="responses")
    ap.add_argument("--force", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("question", nargs="?", default="What's the weather like in Oslo?")
    args = ap.parse_args()

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    client = AsyncOpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))  # fmt: skip
    name = args.model or (await client.models.list()).data[0].id
    cls = OpenAIResponsesModel if args.api == "responses" else OpenAIChatCompletionsModel
    result = await Runner.run(build(cls(model=name, openai_client=client), args.force), args.question)  # fmt: skip
    for item in result.new_items:
        print(f"[{item.agent.name}] {item.type}")
    print(f"final answer from {result.last_agent.name}: {result.final_output}")


if __name__ == "__main__":
    asyncio.run(main())
