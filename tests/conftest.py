"""Shared fixtures: a tiny random model engine factory and the default model (slow tests)."""

from __future__ import annotations

import os

import numpy as np
import pytest

# No persistent compilation cache in tests (an explicit TOKENCAKE_XLA_CACHE still wins): two full
# runs on jax 0.10 CPU died inside the cache's executable serialization (SIGABRT on a read, SIGSEGV
# on a write into a fresh directory), both around tests/test_structured.py. Not yet root-caused.
os.environ.setdefault("TOKENCAKE_XLA_CACHE", "")

from tokencake.config import EngineConfig  # noqa: E402
from tokencake.engine import LLMEngine  # noqa: E402
from tokencake.models.config import tiny_config  # noqa: E402
from tokencake.models.tokenizer import Tokenizer  # noqa: E402
from tokencake.models.weights import NORM_KEYS, random_params  # noqa: E402

TINY_ENGINE = dict(
    num_pages=96,
    page_size=16,
    max_model_len=256,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    max_prefill_chunk=64,
    max_prefill_seqs=2,
    warmup=False,
)


def lively_params(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights scaled up so greedy outputs vary with context (0.02 std gives constant
    outputs, which would make output-equality tests vacuous)."""
    params = random_params(cfg, seed)
    return {k: (v if k in NORM_KEYS else v * 8.0) for k, v in params.items()}


@pytest.fixture(scope="session")
def tiny_model():
    cfg = tiny_config()
    return cfg, lively_params(cfg), Tokenizer.byte_level_for_tests()


@pytest.fixture
def make_engine(tiny_model):
    """Factory: ``make_engine(**EngineConfig overrides)`` over the tiny model (``policy_factory``:
    an unregistered policy); checks the block pool's integrity at teardown."""
    engines: list[LLMEngine] = []

    def make(policy_factory=None, **overrides) -> LLMEngine:
        cfg, params, tok = tiny_model
        engine = LLMEngine(
            EngineConfig(**{**TINY_ENGINE, **overrides}),
            model_config=cfg,
            params=params,
            tokenizer=tok,
            policy=policy_factory,
        )
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.pool.check_integrity()
        e.close()


@pytest.fixture(scope="session")
def default_model():
    """(config, params, tokenizer, name) of SmolLM2-135M-Instruct, fetched on first use."""
    from tokencake.models.hub import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="module")
def served(tiny_model):
    """A tiny-model AsyncEngine behind a BackgroundServer on 127.0.0.1, per test module."""
    from tests.test_server import make_async_engine
    from tokencake.server import BackgroundServer

    engine = make_async_engine(tiny_model)
    server = BackgroundServer(engine)
    yield server, engine
    server.stop()
    engine.shutdown()


# Room for agent-framework prompts (instructions, tool schemas, handoffs, the fallback tool
# prompt) on the byte-level tiny model, where one character is one token.
AGENT_ENGINE = dict(
    num_pages=1100,
    page_size=16,
    max_model_len=4096,
    max_num_seqs=4,
    max_num_batched_tokens=512,
    max_prefill_chunk=512,
    max_prefill_seqs=2,
    warmup=False,
)


@pytest.fixture(scope="module")
def agent_served(tiny_model):
    """A tiny-model server with a 4096-token context for agent frameworks, per test module:
    ``(BackgroundServer, AsyncEngine)``."""
    import dataclasses

    from tokencake.async_engine import AsyncEngine
    from tokencake.server import BackgroundServer

    cfg, params, tok = tiny_model
    cfg = dataclasses.replace(cfg, max_position_embeddings=AGENT_ENGINE["max_model_len"])
    engine = AsyncEngine(
        LLMEngine(EngineConfig(**AGENT_ENGINE), model_config=cfg, params=params, tokenizer=tok)
    )
    server = BackgroundServer(engine)
    yield server, engine
    server.stop()
    engine.shutdown()


# XLA:CPU maps every compiled executable's code into its own memory regions, and Linux caps a
# process's regions (vm.max_map_count, 65,530 by default). An engine that is never freed keeps
# ~600 regions for good; a full run that leaks engines crosses the cap around test 470 and
# then dies inside LLVM (a segfault, or an abort while serializing an executable). So every
# test's engines must be collectable: this fails the test that leaves the process near
# the cap, by name, instead of a later test dying without a trace.
MAP_REGION_BUDGET = 40_000


def _mapped_regions() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


# A full collection costs 1-3 s on this suite's heap (jax, the agent frameworks): after every
# test that was a third of the suite's time. The region count is cheap to read, so a collection
# runs only once the process maps this many regions more than right after the last one (the
# executables the process keeps on purpose, e.g. tokencake/executable_cache.py's, stay mapped).
COLLECT_AFTER_REGIONS = 5_000
_regions_after_collection = [0]


@pytest.fixture(autouse=True)
def _engines_are_freed(request):
    # Checked after every test, not every module: an engine often sits in a reference cycle,
    # and a module that builds many (test_engine) went past 20,000 regions between collections.
    yield
    import gc

    regions = _mapped_regions()
    if regions is None or regions > _regions_after_collection[0] + COLLECT_AFTER_REGIONS:
        gc.collect()
        regions = _mapped_regions()
        _regions_after_collection[0] = regions or 0
    if report := os.environ.get("TOKENCAKE_REPORT_MAPS"):  # a file to append counts to
        with open(report, "a") as f:
            f.write(f"{request.node.nodeid} {regions}\n")
    if regions is not None and regions > MAP_REGION_BUDGET:
        pytest.fail(
            f"{regions} memory regions mapped after {request.node.nodeid} (budget "
            f"{MAP_REGION_BUDGET}, kernel cap vm.max_map_count): engines or compiled "
            "executables are being kept alive; close or drop them"
        )
