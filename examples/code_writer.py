"""Code-Writer: architect -> search tool -> three programmers (test tool each) -> reviewer join.

Runs several applications concurrently on the default model, in process or against a running
``tokencake serve`` (``--url http://127.0.0.1:8000``). Tools are short simulated waits.

    python examples/code_writer.py --apps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from tokencake.app import App, FuncNode, Stage
from tokencake.runtime import EngineTarget, HTTPTarget, HTTPTargetError, Runtime


async def search(call):
    call.stage("query")
    await asyncio.sleep(0.3)
    call.stage("fetch")
    await asyncio.sleep(0.5)
    return '{"results": ["use a heap for top-k", "prefer iterative over recursive"]}'


async def run_tests(call):
    for stage, seconds in (("compile", 0.2), ("unit_tests", 0.6)):
        call.stage(stage)
        await asyncio.sleep(seconds)
    return "tests: 12 passed, 0 failed"


def build() -> App:
    app = App("code_writer", system_prompt="You are a team of careful Python engineers.\n")
    app.agent("architect", "architect", "Task: {task}\nArchitect: outline the design.\n", max_tokens=48,
              tool=FuncNode("search", search, stages=[Stage("query", 0.3), Stage("fetch", 0.5)]))  # fmt: skip
    for k in (1, 2, 3):
        app.agent(f"programmer_{k}", "programmer", f"Programmer {k}: write part {k} of the code.\n",
                  max_tokens=64, after=["architect"], tool=FuncNode("test", run_tests, predict_time=0.8))  # fmt: skip
    app.agent("reviewer", "reviewer", "Reviewer: merge the parts and list any bugs.\n", max_tokens=48,
              after=["programmer_1", "programmer_2", "programmer_3"])  # fmt: skip
    return app


async def main(args: argparse.Namespace) -> None:
    app = build()
    tasks = ["a function that returns the k largest numbers", "an LRU cache class", "a CSV parser"]
    runs = [(app, {"task": tasks[i % len(tasks)]}) for i in range(args.apps)]
    if args.url:
        async with HTTPTarget(args.url, api_key=args.api_key) as target:
            results = await Runtime(target).run_many(runs, arrival_gap_s=0.5)
    else:
        from tokencake.async_engine import AsyncEngine
        from tokencake.config import EngineConfig
        from tokencake.engine import LLMEngine

        engine = AsyncEngine(LLMEngine(EngineConfig(policy=args.policy, max_model_len=1024)))
        try:
            results = await Runtime(EngineTarget(engine)).run_many(runs, arrival_gap_s=0.5)
        finally:
            engine.shutdown()
    print("critical path:", " -> ".join(results[0].graph.critical_path))
    for res in results:
        cached = sum(n.generation.cached_tokens for n in res.nodes.values())
        print(f"app done in {res.elapsed_s:.1f}s, {cached} prompt tokens from the prefix cache")
    print("reviewer said:", " ".join(results[0].nodes["reviewer"].output.split())[:300])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--apps", type=int, default=3)
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
