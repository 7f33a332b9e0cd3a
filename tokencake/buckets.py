"""Step shape buckets: how a step's rows are grouped into compiled executable calls.

Pure Python (no JAX), so the simulator's step model can price a plan exactly the way the
runner will execute it: the runner pads every call to a bucketed ``(rows, tokens per row,
pages per row)`` shape compiled at warm-up, and on XLA:CPU a call's cost follows its padded
shape, not the real token count (one decode row at 600 tokens of context pays for a
128-page gather).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

Shape = tuple[int, int, int]  # (rows, tokens per row, pages per row)
#: A fused call (``fused_steps``): a prefill group's shape and a decode group's shape, run as
#: one executable whose dense parts see both groups' tokens packed together.
FusedShape = tuple[Shape, Shape]
CallShape = Shape | FusedShape


class Call(NamedTuple):
    """One executable call of a step: its groups as ``(is_prefill, row indices, padded
    shape)``, in the order their rows fill the call's sampled rows."""

    groups: tuple[tuple[bool, list[int], Shape], ...]

    @property
    def shape(self) -> CallShape:
        """The compiled shape: a plain :data:`Shape`, or a :data:`FusedShape`."""
        shapes = tuple(g[2] for g in self.groups)
        return shapes[0] if len(shapes) == 1 else shapes  # type: ignore[return-value]

    @property
    def fused(self) -> bool:
        return len(self.groups) > 1


def pow2_buckets(limit: int, start: int = 1, factor: int = 2) -> tuple[int, ...]:
    """``start, start*factor, ...`` capped by and always including ``limit``."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= factor
    out.append(limit)
    return tuple(out)


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds ``n``; ValueError if none does."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest compiled bucket {buckets[-1]}")


@dataclass(frozen=True)
class StepBuckets:
    """The bucket tuples of one engine configuration (ascending; the last is the maximum).
    Computed once per instance: the runner and the simulator read them every step."""

    page_size: int = 16
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_prefill_chunk: int = 512
    max_prefill_seqs: int = 4
    fused_steps: bool = False  # a step's prefill chunk and decode rows share one call
    # the largest prefill token bucket a fused call takes; None: every one (max_prefill_chunk)
    fused_max_tokens: int | None = None
    # False: one page bucket (the maximum), for an attention whose cost follows each call's
    # live context rather than its padded width; smaller buckets would only add programs.
    bucket_pages: bool = True

    @cached_property
    def max_pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)

    @cached_property
    def decode_row_buckets(self) -> tuple[int, ...]:
        return pow2_buckets(self.max_num_seqs)

    @cached_property
    def prefill_row_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({1, self.max_prefill_seqs}))

    @cached_property
    def prefill_token_buckets(self) -> tuple[int, ...]:
        return pow2_buckets(self.max_prefill_chunk, start=min(32, self.max_prefill_chunk), factor=4)

    @cached_property
    def page_buckets(self) -> tuple[int, ...]:
        if not self.bucket_pages:
            return (self.max_pages_per_seq,)
        return pow2_buckets(self.max_pages_per_seq, start=min(8, self.max_pages_per_seq), factor=4)

    def shapes(self) -> list[Shape]:
        """Every (rows, tokens per row, pages per row) the runner compiles."""
        out = [(s, 1, p) for s in self.decode_row_buckets for p in self.page_buckets]
        for q in self.prefill_token_buckets:
            min_pages = math.ceil(q / self.page_size)
            out += [
                (s, q, p)
                for s in self.prefill_row_buckets
                for p in self.page_buckets
                if p >= min_pages
            ]
        return out

    def group_shape(self, rows: Sequence[tuple[int, int]], prefill: bool) -> Shape:
        """Padded shape of one call over ``rows`` given as ``(start, num_tokens)``."""
        row_b = self.prefill_row_buckets if prefill else self.decode_row_buckets
        tok_b = self.prefill_token_buckets if prefill else (1,)
        s = pick_bucket(len(rows), row_b)
        q = pick_bucket(max(n for _, n in rows), tok_b)
        max_pages = max(math.ceil((start + n) / self.page_size) for start, n in rows)
        p = pick_bucket(max(max_pages, math.ceil(q / self.page_size)), self.page_buckets)
        return s, q, p

    def split(self, rows: Sequence[tuple[int, int]]) -> list[tuple[bool, list[int]]]:
        """The runner's calls for one step: ``(is_prefill, row indices)`` in execution order.
        Prefill chunks (more than one token) go first in groups of the largest prefill row
        bucket, then single-token rows in groups of the largest decode row bucket."""
        prefill = [i for i, (_, n) in enumerate(rows) if n > 1]
        decode = [i for i, (_, n) in enumerate(rows) if n == 1]
        rb, db = self.prefill_row_buckets[-1], self.decode_row_buckets[-1]
        return [(True, prefill[i : i + rb]) for i in range(0, len(prefill), rb)] + [
            (False, decode[i : i + db]) for i in range(0, len(decode), db)
        ]

    # ---- fused steps -------------------------------------------------------------------------
    # A fused call pays one weight read for a prefill group and a decode group. Each group keeps
    # its own padded shape (attention is per group), so the family of fused executables is a
    # cross product; it is kept small: one prefill chunk (rows bucket 1) of any token bucket up
    # to ``fused_max_tokens`` and any page bucket, with a decode group from a coarser row ladder
    # (x4) over any page bucket. Other mixes (several chunks in one group) run as separate
    # calls. Long chunks are fused too: on the default model on a CPU a 256-token chunk beside
    # 7 decode rows took 0.85x the time of two calls (64 tokens: 0.77x), for 4 more programs
    # (bench/RESULTS.md, "Fused steps on by default on CPU").
    @cached_property
    def fused_decode_row_buckets(self) -> tuple[int, ...]:
        return pow2_buckets(self.max_num_seqs, factor=4)

    @cached_property
    def fused_token_limit(self) -> int:
        """The largest prefill token bucket a fused call takes."""
        if self.fused_max_tokens is None:
            return self.prefill_token_buckets[-1]
        return self.fused_max_tokens

    def fused_shapes(self) -> list[FusedShape]:
        """Every fused (prefill shape, decode shape) the runner compiles (none unless
        ``fused_steps``)."""
        if not self.fused_steps:
            return []
        prefill = [sh for sh in self.shapes() if sh[0] == 1 and 1 < sh[1] <= self.fused_token_limit]
        decode = [(s, 1, p) for s in self.fused_decode_row_buckets for p in self.page_buckets]
        return [(pf, dc) for pf in prefill for dc in decode]

    def calls(self, rows: Sequence[tuple[int, int]]) -> list[Call]:
        """The runner's calls for one step over ``rows`` given as ``(start, num_tokens)``,
        in execution order. With ``fused_steps`` the last prefill group and the first decode
        group share a call when the pair is in :meth:`fused_shapes`' family."""
        groups = [
            (pf, idx, self.group_shape([rows[i] for i in idx], pf)) for pf, idx in self.split(rows)
        ]
        out = [Call((g,)) for g in groups]
        first_decode = next((i for i, g in enumerate(groups) if not g[0]), None)
        if not self.fused_steps or not first_decode:  # None, or no prefill group before it
            return out
        pf, dc = groups[first_decode - 1], groups[first_decode]
        if pf[2][0] != 1 or pf[2][1] > self.fused_token_limit:
            return out
        # The decode group padded to the fused row ladder (its pages bucket is its own).
        s = pick_bucket(len(dc[1]), self.fused_decode_row_buckets)
        fused = Call((pf, (False, dc[1], (s, 1, dc[2][2]))))
        return [*out[: first_decode - 1], fused, *out[first_decode + 1 :]]

    def call_shapes(self, rows: Sequence[tuple[int, int]]) -> list[CallShape]:
        """Padded shape of every call the runner makes for a step over ``rows``."""
        return [c.shape for c in self.calls(rows)]
