"""Host-side inputs of a step: the rows of the scheduler's chunks (:class:`RowRequest`), and
one call's rows padded to their bucketed shapes (:func:`build_inputs`).

A call runs one group (a prefill group or a decode group, ``tokencake/buckets.py``) or, with
``fused_steps``, a prefill group and a decode group together (``models/llama.py`` packs their
tokens for the dense parts and attends per group). Each group gets its own :class:`Batch` at its
own shape; the sampling inputs cover every group's padded rows in call order, so the call's
sampled row ``i`` is :attr:`CallInputs.rows`\\ ``[i]`` (``None`` for a padding row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tokencake.buckets import Shape
from tokencake.memory.kv_cache import DUMMY_PAGE
from tokencake.models.llama import Batch
from tokencake.row_controls import RowControls
from tokencake.sampler import SamplingInputs
from tokencake.scheduler.plan import ScheduledChunk
from tokencake.scheduler.request import Request


@dataclass(frozen=True)
class RowRequest:
    """What the runner needs of one scheduled chunk: tokens, context, blocks, sampling."""

    request_id: str
    token_ids: Sequence[int]  # the chunk's tokens
    start: int  # position of the first chunk token
    block_ids: Sequence[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    counter: int
    want_top: bool = False  # compute the top-20 logprobs for this row
    min_p: float = 0.0
    controls: RowControls | None = None  # penalties, logit bias, grammar mask (None: none)


class RowSampling(NamedTuple):
    """A request's per-row sampling inputs, as the engine hands them to :func:`rows_from_chunks`."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    want_top: bool
    min_p: float = 0.0
    controls: RowControls | None = None


def rows_from_chunks(
    chunks: Sequence[ScheduledChunk], sampling_of: Callable[[Request], RowSampling]
) -> list[RowRequest]:
    """Build runner rows from scheduler chunks; ``sampling_of(request)`` gives its sampling."""
    rows = []
    for c in chunks:
        req = c.request
        tokens = req.all_token_ids[c.start : c.start + c.num_tokens]
        rs = sampling_of(req)
        rows.append(
            RowRequest(
                req.request_id,
                tokens,
                c.start,
                req.block_ids,
                rs.temperature,
                rs.top_k,
                rs.top_p,
                rs.seed,
                len(req.output_token_ids),
                rs.want_top,
                rs.min_p,
                rs.controls,
            )  # fmt: skip
        )
    return rows


@dataclass
class CallInputs:
    """One call's host inputs: a :class:`Batch` per group, and per padded row (all groups, in
    call order) its request (None: padding) and sampling inputs."""

    batches: tuple[Batch, ...]
    sampling: SamplingInputs
    rows: list[RowRequest | None]


def build_inputs(
    groups: Sequence[tuple[Sequence[RowRequest], Shape]], page_size: int, vocab_size: int
) -> CallInputs:
    """The inputs of a call over ``groups`` (each: its rows and its padded shape)."""
    n = sum(shape[0] for _, shape in groups)
    temp = np.zeros((n,), np.float32)
    top_k = np.zeros((n,), np.int32)
    top_p = np.ones((n,), np.float32)
    seeds = np.zeros((n,), np.int32)
    counters = np.zeros((n,), np.int32)
    want_top = np.zeros((n,), np.int32)
    min_p = np.zeros((n,), np.float32)
    batches: list[Batch] = []
    slots: list[RowRequest | None] = []
    for rows, (s, q, p) in groups:
        ids = np.zeros((s, q), np.int32)
        pos = np.zeros((s, q), np.int32)
        q_lens = np.zeros((s,), np.int32)
        kv_lens = np.zeros((s,), np.int32)
        tables = np.full((s, p), DUMMY_PAGE, np.int32)
        base = len(slots)
        for i, r in enumerate(rows):
            k = len(r.token_ids)
            ids[i, :k] = r.token_ids
            pos[i, :k] = np.arange(r.start, r.start + k)
            q_lens[i] = k
            kv_lens[i] = r.start + k
            nb = math.ceil((r.start + k) / page_size)
            tables[i, :nb] = r.block_ids[:nb]
            j = base + i
            temp[j], top_k[j], top_p[j] = r.temperature, min(r.top_k, vocab_size), r.top_p
            seeds[j], counters[j], want_top[j] = r.seed, r.counter, r.want_top
            min_p[j] = r.min_p
        batches.append(Batch(ids, pos, q_lens, kv_lens, tables))
        slots += [*rows, *([None] * (s - len(rows)))]
    samp = SamplingInputs(temp, top_k, top_p, seeds, counters, want_top, min_p)
    return CallInputs(tuple(batches), samp, slots)


def abstract_batch(rows: int, q: int, pages: int) -> Batch:
    """Shapes and dtypes of one group's :class:`Batch` at bucket ``(rows, q, pages)``."""
    i32 = jax.ShapeDtypeStruct
    return Batch(
        i32((rows, q), jnp.int32), i32((rows, q), jnp.int32), i32((rows,), jnp.int32),
        i32((rows,), jnp.int32), i32((rows, pages), jnp.int32),
    )  # fmt: skip


def abstract_sampling(rows: int) -> SamplingInputs:
    """Shapes and dtypes of the sampling inputs of ``rows`` padded rows."""
    a = jax.ShapeDtypeStruct
    return SamplingInputs(
        a((rows,), jnp.float32), a((rows,), jnp.int32), a((rows,), jnp.float32),
        a((rows,), jnp.int32), a((rows,), jnp.int32), a((rows,), jnp.int32),
        a((rows,), jnp.float32),
    )  # fmt: skip
