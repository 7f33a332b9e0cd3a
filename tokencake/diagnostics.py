"""Measurements taken through a :class:`~tokencake.runner.ModelRunner` outside serving: the
time of one compiled step shape (the simulator's calibration), prefill timings (the cost
model's recompute fit) and a prompt's full logits (correctness checks against references).

None of these touches live KV except :func:`prompt_logits`, which writes the prompt's KV into
the blocks it is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from tokencake.buckets import CallShape
from tokencake.memory.cost_model import CostModel
from tokencake.memory.kv_cache import DUMMY_PAGE
from tokencake.models.llama import Batch
from tokencake.runner import ModelRunner, RowRequest, SamplingInputs


def time_shapes(
    runner: ModelRunner, shapes: list[CallShape], rounds: int = 7, full_context: bool = False
) -> dict[CallShape, float]:
    """Median seconds of one call of each compiled shape (plain or fused) on padding input:
    every row has one token and every page-table entry is the dummy page, so no live KV is
    touched. Each row's context is one token, or with ``full_context`` its page bucket's
    whole span (capped by the model length): an attention backend whose work follows the
    longest row (``chunked``) costs its least and its most at these two. The cache misses of
    gathering live pages are not in either; the simulator prices them per context token.

    The shapes are timed in ``rounds`` interleaved rounds (each round calls every shape once)
    rather than one shape after another: on a shared machine a burst of load then spreads
    over all shapes instead of inflating the few that were being timed while it lasted."""
    calls = {}
    for shape in shapes:
        groups = [shape] if isinstance(shape[0], int) else list(shape)
        batches = []
        for s, q, p in groups:
            one = np.ones((s,), np.int32)
            kv = np.full((s,), min(p * runner.cfg.page_size, runner.cfg.max_model_len), np.int32)
            pos = np.zeros((s, q), np.int32)
            if full_context:
                pos[:, 0] = kv - 1  # the row's one token is its context's last
            batches.append(Batch(np.zeros((s, q), np.int32), pos, one,
                                 kv if full_context else one,
                                 np.full((s, p), DUMMY_PAGE, np.int32)))  # fmt: skip
        n = sum(g[0] for g in groups)
        zi, zf = np.zeros((n,), np.int32), np.zeros((n,), np.float32)
        samp = SamplingInputs(zf, zi, np.ones((n,), np.float32), zi, zi, zi, zf)
        batch = batches[0] if len(batches) == 1 else tuple(batches)
        calls[shape] = (
            runner.compiled(shape),
            batch,
            samp,
            runner.neutral_adjust(n),
            runner.idle_feed(n),
        )
    times: dict[CallShape, list[float]] = {shape: [] for shape in calls}
    for i in range(rounds + 1):
        for shape, (step, batch, samp, adj, feed) in calls.items():
            t0 = time.perf_counter()
            res, _, runner.k, runner.v = step(
                runner.state, runner.k, runner.v, batch, samp, adj, feed
            )
            jax.block_until_ready(res)
            if i:  # the first round pays one-off allocation
                times[shape].append(time.perf_counter() - t0)
    return {shape: float(np.median(t)) for shape, t in times.items()}


def best_call_seconds(runner: ModelRunner, row: RowRequest, repeats: int) -> float:
    """Best of ``repeats`` timed runs of a one-row step (after one untimed run that pays any
    lazy work)."""
    runner.execute([row])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute([row])
        best = min(best, time.perf_counter() - t0)
    return best


def recompute_samples(runner: ModelRunner, repeats: int = 2) -> list[tuple[int, int, float]]:
    """``(new tokens, context, seconds)`` of prefill chunks of a few bucketed shapes, best of
    ``repeats`` (what ``CostModel.fit_recompute`` fits). Rows point every page at the dummy
    page, so no live KV is touched. Call after warm-up."""
    cfg = runner.cfg
    token_sizes = sorted({min(t, cfg.max_prefill_chunk) for t in (32, 128, cfg.max_prefill_chunk)})
    samples = []
    for n in token_sizes:
        for ctx in sorted({0, min(4 * n, cfg.max_model_len - n)}):
            pages = -(-(ctx + n) // cfg.page_size)
            row = RowRequest("_profile", [0] * n, ctx, [DUMMY_PAGE] * pages, 0.0, 0, 1.0, 0, 0)
            samples.append((n, ctx, best_call_seconds(runner, row, repeats)))
    return samples


def step_floor_seconds(runner: ModelRunner, repeats: int = 3) -> float:
    """Seconds of the cheapest step: one decode row at no context, best of ``repeats`` (the
    cost floor ``CostModel.step_floor_s`` stands for: the weight read and fixed overhead).
    The row points at the dummy page, so no live KV is touched. Call after warm-up."""
    row = RowRequest("_profile", [0], 0, [DUMMY_PAGE], 0.0, 0, 1.0, 0, 0)
    return best_call_seconds(runner, row, repeats)


def profile_step_costs(runner: ModelRunner, cost: CostModel) -> None:
    """Fit ``cost``'s recompute terms and time its step floor on ``runner`` (the warm-up
    profile the agent-aware policies and stall-free prefill read). Call after warm-up."""
    cost.fit_recompute(recompute_samples(runner))
    cost.step_floor_s = step_floor_seconds(runner)


def prompt_logits(
    runner: ModelRunner, token_ids: Sequence[int], block_ids: Sequence[int]
) -> np.ndarray:
    """Float32 logits ``[len(token_ids), V]`` for every position of one prompt.

    For correctness checks against reference implementations, not for serving: it compiles
    its own program for the prompt's shape and writes the prompt's KV into ``block_ids``.
    """
    n = len(token_ids)
    pages = math.ceil(n / runner.cfg.page_size)
    if len(block_ids) < pages:
        raise ValueError(f"need {pages} blocks for {n} tokens, got {len(block_ids)}")

    def run(state, k, v, batch):
        model = runner.model(state)
        hidden, k, v = model(batch, k, v, runner.attention_fn)
        return model.logits(hidden[0]), k, v

    batch = Batch(
        np.asarray([token_ids], np.int32), np.arange(n, dtype=np.int32)[None],
        np.asarray([n], np.int32), np.asarray([n], np.int32),
        np.asarray([list(block_ids[:pages])], np.int32),
    )  # fmt: skip
    logits, runner.k, runner.v = jax.jit(run, donate_argnums=(1, 2))(
        runner.state, runner.k, runner.v, batch
    )
    return np.asarray(logits)
