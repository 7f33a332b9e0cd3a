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

Shape = tuple[int, int, int]  # (rows, tokens per row, pages per row)


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

    def call_shapes(self, rows: Sequence[tuple[int, int]]) -> list[Shape]:
        """Padded shape of every call the runner makes for a step over ``rows``."""
        return [self.group_shape([rows[i] for i in idx], pf) for pf, idx in self.split(rows)]
