"""The process-wide executable cache: a second engine with the same shapes compiles nothing
and computes the same tokens; a different program is never served from the cache."""

from __future__ import annotations

import pytest

from tests.helpers.compiles import recorded_compiles
from tokencake import executable_cache
from tokencake.llm import LLM
from tokencake.sampling_params import SamplingParams

PROMPTS = ["the quick brown fox", "multi-agent tool calls " * 4]
PARAMS = [
    SamplingParams(max_tokens=12, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True),
]


def generate(engine) -> list[list[int]]:
    return [o.token_ids for o in LLM.from_engine(engine).generate(PROMPTS, PARAMS)]


def test_second_engine_reuses_the_first_engines_executables(make_engine):
    first = make_engine(num_pages=40)
    want = generate(first)
    shapes = set(first.runner._compiled)
    hits = executable_cache.stats["hits"]
    second = make_engine(num_pages=40, enable_prefix_cache=False)
    with recorded_compiles() as compiles:
        got = generate(second)
    assert compiles == [], f"the second engine compiled: {compiles}"
    assert got == want
    assert set(second.runner._compiled) == shapes
    assert executable_cache.stats["hits"] - hits == len(shapes)
    # Shared executables, separate state: each engine's KV arrays stay its own.
    assert second.runner.k is not first.runner.k


def test_a_different_program_compiles(make_engine):
    generate(make_engine(num_pages=40))
    other = make_engine(num_pages=41)  # another KV shape (used by no other test): another program
    with recorded_compiles() as compiles:
        generate(other)
    assert compiles, "an engine with a different KV shape was served a cached executable"


def test_least_recently_used_executables_leave_first(make_engine, monkeypatch, kept_cache):
    monkeypatch.setattr(executable_cache, "CAPACITY", 1)
    engine = make_engine(num_pages=40, enable_prefix_cache=False)  # same shapes when rerun
    generate(engine)
    assert len(engine.runner._compiled) > 1  # several shapes ran, only the last one is kept
    assert len(executable_cache._cache) == 1
    # The cache dropped the others; the runner still holds all of them.
    with recorded_compiles() as compiles:
        generate(engine)
    assert compiles == []


@pytest.fixture
def kept_cache():
    """An empty cache for the test; the suite's cached executables come back afterwards (the
    other tests' engines reuse them: clearing the cache for good would slow the suite)."""
    saved = executable_cache._cache.copy()
    executable_cache.clear()
    yield
    executable_cache.clear()
    executable_cache._cache.update(saved)
