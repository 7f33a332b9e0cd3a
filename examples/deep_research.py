"""Deep-Research: planner -> parallel searchers (web search tool) -> summarizer join -> writer.

python examples/deep_research.py --questions 2
python examples/deep_research.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys

from tokencake.app import App, FuncNode, Stage
from tokencake.runtime import EngineTarget, HTTPTarget, HTTPTargetError, Runtime


def web_search(call):
    """A sync tool (runs in a worker thread): a simulated search with variable latency."""
    import time

    call.stage("search")
    time.sleep(random.uniform(0.3, 1.0))
    call.stage("rank")
    return f'{{"snippets": ["{call.agent}: three sources agree", "one source disagrees"]}}'


def build(fanout: int = 3) -> App:
    app = App("deep_research", system_prompt="You are a research assistant. Be factual.\n")
    app.agent(
        "planner",
        "planner",
        "Question: {question}\nPlanner: list {n} sub-questions.\n",
        max_tokens=48,
    )
    searcher = FuncNode(
        "web_search", web_search, stages=[Stage("search", 0.7), Stage("rank", 0.05)]
    )
    for k in range(1, fanout + 1):
        app.agent(f"searcher_{k}", "searcher", f"Searcher {k}: research sub-question {k}.\n", max_tokens=32,
                  after=["planner"], tool=searcher)  # fmt: skip
    app.agent("summarizer", "summarizer", "Summarizer: combine the findings.\n", max_tokens=48,
              after=[f"searcher_{k}" for k in range(1, fanout + 1)])  # fmt: skip
    app.agent(
        "writer",
        "writer",
        "Writer: the final answer in one paragraph.\n",
        max_tokens=64,
        after=["summarizer"],
    )
    return app


async def main(args: argparse.Namespace) -> None:
    app = build()
    questions = ["Why is the sky blue?", "How do vaccines work?", "What causes inflation?"]
    runs = [
        (app, {"question": questions[i % len(questions)], "n": "3"}) for i in range(args.questions)
    ]
    if args.url:
        async with HTTPTarget(args.url, api_key=args.api_key) as target:
            results = await Runtime(target).run_many(runs, arrival_gap_s=0.3)
    else:
        from tokencake.async_engine import AsyncEngine
        from tokencake.config import EngineConfig
        from tokencake.engine import LLMEngine

        engine = AsyncEngine(LLMEngine(EngineConfig(policy=args.policy, max_model_len=1024)))
        try:
            results = await Runtime(EngineTarget(engine)).run_many(runs, arrival_gap_s=0.3)
        finally:
            engine.shutdown()
    for res in results:
        meta = res.nodes["searcher_1"].metadata
        print(
            f"{res.elapsed_s:.1f}s; searcher_1 join_group={meta['join_group']!r} critical={meta['critical_path']}"
        )
        print("  answer:", " ".join(res.nodes["writer"].output.split())[:200])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--url", default=None, help="a running tokencake server (default: in process)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("TOKENCAKE_API_KEY"),
        help="the server's key (default: $TOKENCAKE_API_KEY)",
    )
    p.add_argument("--policy", default="tokencake")
    try:
        asyncio.run(main(p.parse_args()))
    except HTTPTargetError as exc:  # unreachable server or refused key: one line, no traceback
        sys.exit(f"{os.path.basename(__file__)}: {exc}")
