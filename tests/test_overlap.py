"""Overlap scheduling (``EngineConfig.overlap``, tokencake/overlap.py): the same outputs as the
synchronous loop for a mixed batch (lengths, stop strings, max_tokens, an abort mid-run,
logit controls, n > 1, preemption and prefix hits), no block leaked, nothing compiled after
warm-up (that one in test_engine.py's warm-up test, which runs both modes). Both modes run on
one engine (``set_overlap``), so the steps are compiled once."""

from __future__ import annotations

import pytest

from tests.test_engine import PROMPTS  # the same mixed lengths as the invariance tests
from tokencake.sampling_params import SamplingParams

ABORTED = 3  # index of the request aborted mid-run
ABORT_AT = 6  # ... after this many engine steps


def drive(engine, params: list[SamplingParams]) -> dict[int, tuple]:
    """Run PROMPTS with ``params`` to completion, aborting one request mid-run; returns
    ``{index: (token_ids, text, finish_reason)}`` of every request that finished itself
    (choices of an n > 1 request keyed ``index * 10 + choice``)."""
    ids = [
        engine.add_request(p, sp, request_id=f"r{i}")
        for i, (p, sp) in enumerate(zip(PROMPTS, params, strict=True))
    ]
    done: dict[int, tuple] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.error is None:
                i = int(out.request_id[1:])
                done[i * 10 + out.index] = (tuple(out.token_ids), out.text, out.finish_reason)
        steps += 1
        if steps == ABORT_AT:
            assert engine.abort_request(ids[ABORTED])
        assert steps < 500
    return done


def mixed_params(stops: list[str]) -> list[SamplingParams]:
    """Different lengths, stop strings (taken from a plain run so they fire), an EOS-able row,
    a penalized row (its steps fall back to synchronous) and a seeded n=2 sampled row."""
    return [
        SamplingParams(max_tokens=24, ignore_eos=True, stop=[stops[0]]),
        SamplingParams(max_tokens=5, ignore_eos=True),
        SamplingParams(
            max_tokens=40, ignore_eos=True, stop=[stops[2]], include_stop_str_in_output=True
        ),
        SamplingParams(max_tokens=30, ignore_eos=True),
        SamplingParams(max_tokens=17, presence_penalty=1.0, logit_bias={70: 3.0}),
        SamplingParams(max_tokens=20, n=2, temperature=0.8, seed=7, ignore_eos=True),
    ]


def stops_from(engine) -> list[str]:
    """Two-character stop strings from the middle of a plain run's texts (so they fire)."""
    plain = drive(engine, [SamplingParams(max_tokens=24, ignore_eos=True)] * len(PROMPTS))
    texts = {i // 10: t[1] for i, t in plain.items()}
    return [texts.get(i, "xx")[8:10] or "xx" for i in range(len(PROMPTS))]


def test_overlap_matches_synchronous_loop(make_engine):
    # 15 usable blocks for 6 sequences: decode growth preempts; the runs after the first hit
    # the prefix cache it filled.
    engine = make_engine(num_pages=16, max_num_seqs=6, overlap=True)
    params = mixed_params(stops_from(engine))
    engine.set_overlap(True)
    over = drive(engine, params)
    assert engine.overlap.overlapped_steps > 0 and engine.overlap.sync_steps > 0
    engine.set_overlap(False)
    sync = drive(engine, params)
    assert over == sync
    assert ABORTED * 10 not in sync and len(sync) == len(PROMPTS)  # 5 requests, one with n=2
    reasons = [sync[i * 10][2] for i in (0, 1, 2)]
    assert reasons == ["stop", "length", "stop"], reasons  # the stop strings fired
    assert engine.scheduler.num_preemptions > 0 and engine.pool.hits > 0
    engine.pool.check_integrity()
    assert engine.pool.num_free == engine.pool.capacity  # nothing leaked (aborted row too)


def test_abort_of_every_request_leaves_the_engine_idle(make_engine):
    """Aborting every request while a step is in flight: the engine is idle at once (the
    step has nothing left to report), no block is held, and the next request runs as on a
    fresh engine (greedy tokens equal the synchronous loop's)."""
    engine = make_engine(enable_prefix_cache=False)
    assert engine.overlap is not None  # the default on one device
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, greedy) for p in PROMPTS[:3]]
    for _ in range(3):
        engine.step()
    assert engine.overlap.in_flight is not None and engine.pool.num_used > 0
    for rid in ids:
        assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests() and engine.pool.num_used == 0
    after = drive_one(engine, PROMPTS[4], greedy)
    engine.set_overlap(False)  # settles the in-flight step nobody reads any more
    assert drive_one(engine, PROMPTS[4], greedy) == after
    engine.pool.check_integrity()
    assert engine.pool.num_free == engine.pool.capacity


def drive_one(engine, prompt: str, params: SamplingParams) -> list[int]:
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id == rid and out.error is None
                tokens = list(out.token_ids)
    return tokens


def test_overlap_refused_with_tensor_parallelism():
    from tokencake.config import EngineConfig

    with pytest.raises(ValueError, match="overlap"):
        EngineConfig(overlap=True, tensor_parallel_size=2)


def test_cli_flag_sets_overlap():
    from tokencake.cli import build_parser, engine_config_from_args

    def overlap(*flags: str) -> bool:
        return engine_config_from_args(build_parser().parse_args(["serve", *flags])).overlap

    assert overlap("--overlap") and not overlap("--no-overlap")
    assert overlap()  # on by default on one device
    assert not overlap("--tensor-parallel-size", "2")  # and off where it is not supported


def test_overlap_default_follows_device_count():
    from tokencake.config import EngineConfig

    assert EngineConfig().overlap is True
    assert EngineConfig(tensor_parallel_size=2).overlap is False
    assert EngineConfig(distributed=True).overlap is False
    assert EngineConfig(overlap=False).overlap is False
