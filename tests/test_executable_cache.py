"""The process-wide executable cache: a second engine with the same shapes compiles nothing
and computes the same tokens; a different program is never served from the cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    first = make_engine()
    want = generate(first)
    shapes = set(first.runner._compiled)
    hits = executable_cache.stats["hits"]
    second = make_engine(enable_prefix_cache=False)
    with recorded_compiles() as compiles:
        got = generate(second)
    assert compiles == [], f"the second engine compiled: {compiles}"
    assert got == want
    assert set(second.runner._compiled) == shapes
    assert executable_cache.stats["hits"] - hits == len(shapes)
    # Shared executables, separate state: each engine's KV arrays stay its own.
    assert second.runner.k is not first.runner.k


def test_a_different_program_compiles(make_engine):
    one = SamplingParams(max_tokens=2, ignore_eos=True)
    LLM.from_engine(make_engine()).generate(PROMPTS[:1], one)  # these shapes are now cached
    other = make_engine(num_pages=41)  # another KV shape (used by no other test): another program
    with recorded_compiles() as compiles:
        LLM.from_engine(other).generate(PROMPTS[:1], one)
    assert compiles, "an engine with a different KV shape was served a cached executable"


def test_least_recently_used_executables_leave_first(monkeypatch, kept_cache):
    monkeypatch.setitem(executable_cache.CAPACITY, "step", 2)
    x = jnp.zeros(3)

    def program(c: float) -> jax.stages.Lowered:
        """A fresh lowering (jax keeps a Lowered's executable): keys differ by the constant."""
        return jax.jit(lambda a: a + c).lower(x)

    def compiles(c: float, kind: str = "step") -> int:
        misses = executable_cache.stats["misses"]
        executable_cache.compile_lowered(program(c), x, kind)
        return executable_cache.stats["misses"] - misses

    assert compiles(1.0) == 1 and compiles(2.0) == 1
    assert compiles(1.0) == 0  # a hit, and now the most recently used
    assert compiles(3.0) == 1  # full: the least recently used (2.0) leaves
    assert len(executable_cache._caches["step"]) == 2
    assert compiles(1.0) == 0
    # Other kinds have their own budget: cheap copy kernels do not push steps out.
    assert all(compiles(c, "copy") == 1 for c in (4.0, 5.0, 6.0))
    assert compiles(1.0) == 0 and compiles(3.0) == 0
    assert compiles(2.0) == 1
    with pytest.raises(ValueError, match="unknown executable kind"):
        executable_cache.compile_lowered(program(1.0), x, "kernel")
    assert float(executable_cache.compile_lowered(program(2.0), x)(x)[0]) == 2.0


def test_a_runner_keeps_its_executables_when_the_cache_drops_them(make_engine):
    engine = make_engine(enable_prefix_cache=False)  # same shapes when rerun
    want = generate(engine)  # compiles, or reuses the suite's executables
    with executable_cache.emptied(), recorded_compiles() as compiles:
        assert generate(engine) == want
    assert compiles == []


@pytest.fixture
def kept_cache():
    """An empty cache for the test; the suite's cached executables come back afterwards (the
    other tests' engines reuse them: clearing the cache for good would slow the suite)."""
    with executable_cache.emptied():
        yield
