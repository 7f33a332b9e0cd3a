"""AsyncEngine: streaming, cancellation at any point frees blocks, a failing step does not kill
the engine thread."""

from __future__ import annotations

import asyncio

import pytest

from tokencake.async_engine import AsyncEngine
from tokencake.sampling_params import SamplingParams
from tokencake.scheduler.faults import StepFailed


@pytest.fixture
def async_engine(make_engine):
    engine = AsyncEngine(make_engine(enable_prefix_cache=False))
    yield engine
    engine.shutdown()


async def _wait_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        if not await engine.call(lambda e: e.has_unfinished_requests()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("engine never went idle")


def test_stream_matches_generate(async_engine):
    async def main():
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        deltas = [o.delta_text async for o in async_engine.stream("hello there", params)]
        final = await async_engine.generate("hello there", params)
        assert "".join(deltas) == final.text and final.finished

    asyncio.run(main())


def test_cancel_while_adding_and_while_streaming_frees_blocks(async_engine):
    async def consume(n_items: int | None):
        got = 0
        async for _ in async_engine.stream(
            "x" * 40, SamplingParams(max_tokens=200, ignore_eos=True)
        ):
            got += 1
            if n_items is not None and got >= n_items:
                await asyncio.sleep(10)

    async def main():
        tasks = [asyncio.create_task(consume(n)) for n in (None, 1, 3)]
        await asyncio.sleep(0)  # the first task is cancelled before its add completes
        tasks[0].cancel()
        await asyncio.sleep(0.3)
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _wait_idle(async_engine)
        pool = async_engine.engine.pool
        assert pool.num_free == pool.capacity

    asyncio.run(main())


def test_failing_step_fails_requests_but_engine_keeps_serving(async_engine):
    runner = async_engine.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device failure")
        return real(rows)

    runner.execute = flaky

    async def main():
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        with pytest.raises(StepFailed, match="engine step failed"):
            await async_engine.generate("first", params)
        out = await async_engine.generate("second", params)
        assert out.finished and len(out.token_ids) == 8
        pool = async_engine.engine.pool
        assert pool.num_free == pool.capacity

    asyncio.run(main())
