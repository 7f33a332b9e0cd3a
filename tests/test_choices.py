"""``n > 1``: choices share the prompt's full KV blocks, sample independent streams, and
leave nothing behind."""

from __future__ import annotations

from tokencake.llm import LLM
from tokencake.sampling_params import SamplingParams
from tokencake.structured import JsonObject

PROMPT = "forty tokens of prompt: abcdefghijklmnopqrstuv"  # 2 full blocks + a partial one


def test_choices_equal_solo_requests_with_consecutive_seeds(make_engine):
    engine = make_engine()
    outs = LLM.from_engine(engine).generate(
        [PROMPT], SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5)
    )
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(o.request_id == outs[0].request_id and o.finished for o in outs)
    solo = make_engine()
    ref = [
        LLM.from_engine(solo).generate(
            [PROMPT], SamplingParams(max_tokens=12, temperature=1.0, seed=5 + i)
        )[0]  # fmt: skip
        for i in range(3)
    ]
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert len({tuple(o.token_ids) for o in outs}) > 1  # independent streams
    assert engine.pool.num_used == 0


def test_choices_share_prompt_blocks(make_engine):
    engine = make_engine()
    ps = engine.pool.block_size
    prompt_ids = engine.tokenizer.encode(PROMPT)
    full = len(prompt_ids) // ps
    assert full >= 2 and len(prompt_ids) % ps  # a partial last block to copy on write
    rid = engine.add_request(prompt_ids, SamplingParams(n=3, max_tokens=20))
    members = [rid, f"{rid}#1", f"{rid}#2"]
    seen_running = False
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        reqs = [engine.scheduler.requests.get(m) for m in members]
        if all(r is not None and len(r.output_token_ids) > 0 for r in reqs):
            seen_running = True
            shared = reqs[0].block_ids[:full]
            for r in reqs[1:]:
                assert r.block_ids[:full] == shared  # the same pages, not copies
                assert r.num_cached_tokens == full * ps
                assert r.block_ids[full] != reqs[0].block_ids[full]  # own partial block
            assert all(engine.pool.ref_count(b) == 3 for b in shared)
    assert seen_running
    final = [o for o in outs if o.finished]
    assert sorted(o.index for o in final) == [0, 1, 2]
    assert [o.choices_left for o in final][-1] == 0 and final[-1].request_finished
    # Greedy choices are identical (as with OpenAI's n on temperature 0).
    assert len({tuple(o.token_ids) for o in final}) == 1
    assert engine.pool.num_used == 0
    engine.pool.check_integrity()


def test_abort_frees_every_choice(make_engine):
    engine = make_engine()
    rid = engine.add_request(PROMPT, SamplingParams(n=4, max_tokens=50, structured=JsonObject()))
    engine.step()  # choice 0 prefills; the others are released
    engine.step()
    assert engine.pool.num_used > 0
    assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests() and engine.pool.num_used == 0
    assert not engine.abort_request(rid)
    # Aborted before choice 0 ever ran: pending choices vanish too.
    rid = engine.add_request(PROMPT, SamplingParams(n=2, max_tokens=8))
    assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests() and engine.pool.num_used == 0
    engine.pool.check_integrity()


def test_duplicate_choice_ids_are_refused(make_engine):
    engine = make_engine()
    engine.add_request("a", SamplingParams(max_tokens=2), request_id="r#1")
    try:
        engine.add_request("a", SamplingParams(n=2, max_tokens=2), request_id="r")
    except ValueError as e:
        assert "duplicate" in str(e)
    else:
        raise AssertionError("a choice id collided silently")
    assert len(engine.scheduler.requests) == 1


def test_async_stream_yields_every_choice_then_ends(make_engine):
    import asyncio

    from tokencake.async_engine import AsyncEngine

    engine = AsyncEngine(make_engine())

    async def main():
        params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True)
        text = {0: "", 1: "", 2: ""}
        last = None
        async for out in engine.stream(PROMPT, params):
            text[out.index] += out.delta_text
            last = out
        assert last.request_finished
        return text

    try:
        text = asyncio.run(main())
        assert all(text.values()) and len(set(text.values())) > 1
    finally:
        engine.shutdown()
