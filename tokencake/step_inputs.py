"""Host-side inputs of one step call: the rows of its groups padded to their bucketed shapes.

A call runs one group (a prefill group or a decode group, ``tokencake/buckets.py``) or, with
``fused_steps``, a prefill group and a decode group together (``models/llama.py`` packs their
tokens for the dense parts and attends per group). Each group gets its own :class:`Batch` at its
own shape; the sampling inputs cover every group's padded rows in call order, so the call's
sampled row ``i`` is :attr:`CallInputs.rows`\\ ``[i]`` (``None`` for a padding row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from tokencake.buckets import Shape
from tokencake.memory.kv_cache import DUMMY_PAGE
from tokencake.models.llama import Batch
from tokencake.sampler import SamplingInputs

if TYPE_CHECKING:
    from tokencake.runner import RowRequest


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
