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
    real = runner.dispatch  # the device call (the synchronous and the overlapped step)
    calls = {"n": 0}

    def flaky(rows, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device failure")
        return real(rows, *args, **kwargs)

    runner.dispatch = flaky

    async def main():
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        with pytest.raises(StepFailed, match="engine step failed"):
            await async_engine.generate("first", params)
        out = await async_engine.generate("second", params)
        assert out.finished and len(out.token_ids) == 8
        pool = async_engine.engine.pool
        assert pool.num_free == pool.capacity

    asyncio.run(main())


def test_named_engine_calls(async_engine):
    """What the server and the runtime use: tokenize (typed refusals), kv_stats, lifecycle
    events, alive/info; no closures over the engine's internals."""
    from tokencake.scheduler.errors import RequestRejected
    from tokencake.scheduler.lifecycle import Disposition

    e = async_engine

    async def main():
        ids = await e.tokenize("hello")
        assert ids == e.engine.tokenizer.encode("hello")
        assert await e.tokenize([1, 2, 3]) == [1, 2, 3]
        with pytest.raises(RequestRejected) as r:
            await e.tokenize([1, e.info.vocab_size])
        assert r.value.param == "prompt"
        chat = await e.tokenize_chat([{"role": "user", "content": "hi"}])
        assert chat == e.engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        with pytest.raises(RequestRejected) as r:
            await e.tokenize_chat([{"role": "user"}])
        assert r.value.param == "messages"
        kv = await e.kv_stats()
        assert (kv.used, kv.waiting, kv.running) == (0, 0, 0) and kv.capacity > 0
        disp, body = await e.lifecycle_event({"event": "stall_finished", "lifecycle_id": "nope"})
        assert disp is Disposition.UNKNOWN and body["state"] == "unknown"

    assert e.alive and e.info.max_seq_tokens <= e.info.max_model_len
    asyncio.run(main())


def test_token_texts_from_another_thread_while_the_engine_decodes(async_engine):
    """The tokenizer is shared with the event loop's logprob decoding: it guards itself."""
    import threading

    e = async_engine
    ids = e.engine.tokenizer.encode("multi-agent tool calls")
    want = [e.engine.tokenizer.decode([t]) for t in ids]
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer():
        try:
            # A short wait between calls: a spinning thread holds the GIL and slows the engine
            # thread down for no extra coverage (still thousands of calls per second).
            while not stop.wait(0.0002):
                assert e.token_texts(ids) == want
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async def main():
        params = SamplingParams(max_tokens=24, ignore_eos=True)
        outs = await asyncio.gather(*(e.generate(f"p{i}", params) for i in range(4)))
        assert all(o.finished and len(o.token_ids) == 24 for o in outs)

    # Once alone first, so the step shapes are compiled before the threads start: tracing a
    # step under two spinning Python threads took most of this test's time.
    asyncio.run(main())
    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        asyncio.run(main())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
