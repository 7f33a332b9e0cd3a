"""A LangChain tool-calling agent loop and structured output, against any OpenAI-compatible
server (nothing Tokencake-specific but the base URL).

    tokencake serve --port 8000
    python examples/langchain_tools.py --base-url http://127.0.0.1:8000/v1

With the 135M default model ``--force`` (on by default) makes the first turn call a tool
through ``tool_choice`` (the server's grammar keeps the call valid); with a tool-capable
checkpoint pass ``--no-force``.
"""

from __future__ import annotations

import argparse
import os
from typing import Annotated, Literal

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field


@tool
def get_weather(city: Literal["Paris", "Oslo", "Lima", "Tokyo"]) -> str:
    """The current weather in a city."""
    return f"sunny, 21 C in {city}"


@tool
def convert(celsius: Annotated[int, Field(ge=-50, le=60)]) -> str:
    """Convert a temperature from Celsius to Fahrenheit."""
    return f"{celsius * 9 / 5 + 32:.0f} F"


class Report(BaseModel):
    """A weather report."""

    city: Literal["Paris", "Oslo", "Lima", "Tokyo"]
    sunny: bool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))  # fmt: skip
    ap.add_argument("--model", default=None, help="model name (default: the server's only model)")
    ap.add_argument("--force", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-turns", type=int, default=4)
    args = ap.parse_args()

    key = os.environ.get("OPENAI_API_KEY", "unused")
    name = args.model or OpenAI(base_url=args.base_url, api_key=key).models.list().data[0].id
    llm = ChatOpenAI(model=name, base_url=args.base_url, api_key=key, max_tokens=128)  # fmt: skip
    tools = {t.name: t for t in (get_weather, convert)}
    messages = [SystemMessage("Use the tools to answer."), HumanMessage("How warm is it in Lima?")]
    for turn in range(args.max_turns):
        # first turn forced (a tiny model would not call on its own), then the model decides
        choice = "required" if args.force and turn == 0 else "auto"
        bound = llm.bind_tools(list(tools.values()), tool_choice=choice, parallel_tool_calls=False)
        ai = bound.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            print("answer:", ai.content)
            break
        for call in ai.tool_calls:
            result: ToolMessage = tools[call["name"]].invoke(call)
            print(f"tool {call['name']}({call['args']}) -> {result.content}")
            messages.append(result)

    report = llm.with_structured_output(Report, method="json_schema").invoke("Report Oslo's weather.")  # fmt: skip
    print("structured:", report)


if __name__ == "__main__":
    main()
