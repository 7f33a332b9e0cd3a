"""Paged attention: the reference against dense attention, and the kernels against the reference.

Every batch scatters each sequence's KV over scrambled, non-contiguous pages, mixes prefill chunks
with decode rows, ends some sequences mid-page and includes padding rows (``q_len == 0``) whose
block table is all dummy page 0. Pallas kernels run in interpret mode here, so shapes stay tiny.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokencake.models.attention import pallas_gpu, pallas_tpu
from tokencake.models.attention.backend import default_backend_name, get_backend
from tokencake.models.attention.chunked import chunked_paged_attention
from tokencake.models.attention.reference import dense_causal_attention
from tokencake.models.attention.reference import (
    reference_paged_attention as _reference_paged_attention,
)

# Jitted once per shape: eager dispatch of the oracles would dominate this file's run time.
reference_paged_attention = jax.jit(_reference_paged_attention, static_argnames="scale")
dense_attention = jax.jit(dense_causal_attention, static_argnames="scale")

F32_TOL = 2e-5
# bf16 inputs and output (8-bit mantissa: one ulp is 7.8e-3 for values in [1, 2)) and bf16
# probabilities in the kernel's p @ v matmul; the observed error is 7.8e-3, i.e. one output ulp.
BF16_TOL = 2e-2

# (q_len, kv_len) rows: a prefill chunk over a cached prefix ending mid-page, a length-1 sequence,
# a long decode row, a padding row, and a whole prompt of exactly one page.
MIXED_ROWS = ((5, 37), (1, 1), (1, 50), (0, 0), (16, 16))


@dataclass
class Batch:
    """A ragged paged batch plus each sequence's contiguous queries/keys/values (for oracles)."""

    q: jax.Array  # [S, Q, Hq, D]
    k_pages: jax.Array  # [N, page, Hkv, D]
    v_pages: jax.Array
    block_tables: jax.Array  # [S, P]
    q_lens: jax.Array
    kv_lens: jax.Array
    used: np.ndarray  # [N, page] bool: slots holding some sequence's live token
    full_q: list[np.ndarray]  # per row: queries for all kv_len positions [kv_len, Hq, D]
    full_k: list[np.ndarray]  # per row: [kv_len, Hkv, D]
    full_v: list[np.ndarray]

    def args(self) -> tuple[jax.Array, ...]:
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.q_lens, self.kv_lens)


def make_batch(
    rows: tuple[tuple[int, int], ...],
    *,
    hq: int,
    hkv: int,
    d: int,
    page: int,
    dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
) -> Batch:
    """Build a batch whose sequences own randomly chosen, interleaved pages (page 0 never used)."""
    rng = np.random.default_rng(seed)
    npages = [-(-kv // page) for _, kv in rows]
    width = max(max(npages) + 1, 2)  # one spare column of padding entries for every row
    num_pages = sum(npages) + 3  # dummy page 0 plus two never-used pages
    order = rng.permutation(np.arange(1, num_pages))
    k = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    qn = max(max(q for q, _ in rows), 1)
    q = np.zeros((len(rows), qn, hq, d), np.float32)
    tables = np.zeros((len(rows), width), np.int32)
    used = np.zeros((num_pages, page), bool)
    full_q, full_k, full_v = [], [], []
    nxt = 0
    for s, ((q_len, kv_len), n) in enumerate(zip(rows, npages, strict=True)):
        tables[s, :n] = order[nxt : nxt + n]
        nxt += n
        for t in range(kv_len):
            used[tables[s, t // page], t % page] = True
        fq = rng.standard_normal((kv_len, hq, d)).astype(np.float32)
        q[s, :q_len] = fq[kv_len - q_len :]
        full_q.append(fq)
        full_k.append(k[tables[s, :n]].reshape(-1, hkv, d)[:kv_len])
        full_v.append(v[tables[s, :n]].reshape(-1, hkv, d)[:kv_len])
    return Batch(
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(tables),
        jnp.asarray([r[0] for r in rows], jnp.int32),
        jnp.asarray([r[1] for r in rows], jnp.int32),
        used,
        full_q,
        full_k,
        full_v,
    )


def poisoned(batch: Batch, value: float) -> Batch:
    """The same batch with every slot no live token occupies (page 0, free pages, page tails) set
    to ``value``."""
    mask = jnp.asarray(~batch.used)[:, :, None, None]
    fill = jnp.asarray(value, batch.k_pages.dtype)
    return Batch(
        batch.q,
        jnp.where(mask, fill, batch.k_pages),
        jnp.where(mask, fill, batch.v_pages),
        *(
            batch.block_tables,
            batch.q_lens,
            batch.kv_lens,
            batch.used,
            batch.full_q,
            batch.full_k,
            batch.full_v,
        ),
    )


def max_err(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def assert_rows_match_dense(out: jax.Array, b: Batch, scale: float) -> None:
    """Each row's live queries equal dense causal attention over its own contiguous keys;
    its padding query slots are zero."""
    for s, (q_len, kv_len) in enumerate(zip(b.q_lens.tolist(), b.kv_lens.tolist(), strict=True)):
        if q_len:
            want = dense_attention(
                jnp.asarray(b.full_q[s]),
                jnp.asarray(b.full_k[s]),
                jnp.asarray(b.full_v[s]),
                scale=scale,
            )[kv_len - q_len :]
            assert max_err(out[s, :q_len], want) <= F32_TOL, f"row {s}"
        assert not jnp.any(out[s, q_len:]), f"padding slots of row {s} must be zero"


def pallas(batch: Batch, scale: float) -> jax.Array:
    return pallas_gpu.pallas_paged_attention(*batch.args(), scale=scale, interpret=True)


# --- (1) reference vs dense causal attention ---------------------------------------------------


@pytest.mark.parametrize("group", [1, 3, 4])
def test_reference_matches_dense(group: int) -> None:
    hkv, d = 2, 16
    b = make_batch(MIXED_ROWS, hq=group * hkv, hkv=hkv, d=d, page=16, seed=group)
    assert_rows_match_dense(reference_paged_attention(*b.args(), scale=d**-0.5), b, d**-0.5)


# --- (2) pallas-gpu (interpret mode) vs reference ----------------------------------------------


@pytest.mark.parametrize(
    ("group", "hkv", "page"),
    [(1, 2, 16), (3, 3, 32), (4, 2, 16), (8, 1, 32)],
)
def test_pallas_matches_reference_mixed(group: int, hkv: int, page: int) -> None:
    d = 32
    b = make_batch(MIXED_ROWS, hq=group * hkv, hkv=hkv, d=d, page=page, seed=10 + group)
    want = reference_paged_attention(*b.args(), scale=d**-0.5)
    got = pallas(b, d**-0.5)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert max_err(got, want) <= F32_TOL
    assert not jnp.any(got[3]), "the padding row must come back as zeros"


def test_pallas_matches_reference_decode_only() -> None:
    """A pure decode step (Q == 1): the smallest query block, split-KV over a long context."""
    rows = ((1, 70), (1, 1), (1, 16), (0, 0), (1, 33))
    b = make_batch(rows, hq=9, hkv=3, d=64, page=16, seed=3)
    want = reference_paged_attention(*b.args(), scale=0.125)
    assert max_err(pallas(b, 0.125), want) <= F32_TOL


def test_pallas_single_split_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """With split-KV off (as on a large batch) the one-split path gives the same answer."""
    monkeypatch.setattr(pallas_gpu, "TARGET_PROGRAMS", 1)
    b = make_batch(((3, 40), (1, 20), (0, 0)), hq=4, hkv=2, d=16, page=16, seed=4)
    want = reference_paged_attention(*b.args(), scale=0.25)
    # Call the undecorated function so the patched constant is read at trace time.
    fn = getattr(pallas_gpu.pallas_paged_attention, "__wrapped__", None)
    assert fn is not None
    assert max_err(fn(*b.args(), scale=0.25, interpret=True), want) <= F32_TOL


def test_pallas_bf16() -> None:
    b = make_batch(MIXED_ROWS, hq=6, hkv=2, d=32, page=16, dtype=jnp.bfloat16, seed=5)
    want = reference_paged_attention(*b.args(), scale=32**-0.5)
    got = pallas(b, 32**-0.5)
    assert got.dtype == jnp.bfloat16
    assert max_err(got, want) <= BF16_TOL


def test_pallas_rejects_unsupported_shapes() -> None:
    b = make_batch(((1, 5),), hq=2, hkv=1, d=16, page=16)
    bad_page = jnp.zeros((4, 12, 1, 16))
    with pytest.raises(ValueError, match="page_size"):
        pallas_gpu.pallas_paged_attention(
            b.q,
            bad_page,
            bad_page,
            b.block_tables,
            b.q_lens,
            b.kv_lens,
            scale=1.0,
            interpret=True,
        )
    with pytest.raises(ValueError, match="head_dim"):
        pallas_gpu.check_shapes(16, 24)


# --- (2b) chunked (the CPU default) vs reference ------------------------------------------------

chunked = jax.jit(chunked_paged_attention, static_argnames=("scale", "chunk_tokens"))


@pytest.mark.parametrize(
    ("group", "hkv", "page", "chunk_tokens"),
    [(1, 2, 16, 16), (3, 3, 16, 32), (4, 2, 8, 24), (8, 1, 32, 64), (3, 3, 16, 4096)],
)
def test_chunked_matches_reference_mixed(
    group: int, hkv: int, page: int, chunk_tokens: int
) -> None:
    """Chunks of one page, of several, of a page count that does not divide the table width
    (the table is padded), and one chunk wider than every context."""
    d = 32
    b = make_batch(MIXED_ROWS, hq=group * hkv, hkv=hkv, d=d, page=page, seed=20 + group)
    want = reference_paged_attention(*b.args(), scale=d**-0.5)
    got = chunked(*b.args(), scale=d**-0.5, chunk_tokens=chunk_tokens)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert max_err(got, want) <= F32_TOL
    assert not jnp.any(got[3]), "the padding row must come back as zeros"


def test_chunked_matches_dense_on_a_long_decode_batch() -> None:
    """Decode rows (the default model's 9/3 heads x 64) whose contexts span many chunks, each row
    against dense causal attention over its own contiguous keys."""
    rows = ((1, 150), (1, 1), (1, 64), (1, 65), (0, 0), (1, 97))
    b = make_batch(rows, hq=9, hkv=3, d=64, page=16, seed=21)
    assert_rows_match_dense(chunked(*b.args(), scale=0.125, chunk_tokens=32), b, 0.125)


def test_chunked_row_does_not_depend_on_its_batch() -> None:
    """A row's output is bit-identical alone and beside a much longer row (which adds chunks
    that are wholly past the short row's context) and in a wider padded table."""
    b = make_batch(((1, 40), (1, 300)), hq=6, hkv=2, d=16, page=16, seed=22)
    both = chunked(*b.args(), scale=0.25, chunk_tokens=32)
    alone = chunked(
        b.q[:1],
        b.k_pages,
        b.v_pages,
        b.block_tables[:1, :3],
        b.q_lens[:1],
        b.kv_lens[:1],
        scale=0.25,
        chunk_tokens=32,
    )
    assert bool(jnp.all(both[0] == alone[0]))


def test_chunked_bf16_and_poisoned_pages() -> None:
    b = make_batch(MIXED_ROWS, hq=6, hkv=2, d=32, page=16, dtype=jnp.bfloat16, seed=23)
    got = chunked(*b.args(), scale=32**-0.5, chunk_tokens=16)
    assert got.dtype == jnp.bfloat16
    assert max_err(got, reference_paged_attention(*b.args(), scale=32**-0.5)) <= BF16_TOL
    f = make_batch(MIXED_ROWS, hq=6, hkv=2, d=16, page=16, seed=24)
    clean = chunked(*f.args(), scale=0.25, chunk_tokens=16)
    dirty = chunked(*poisoned(f, 1e30).args(), scale=0.25, chunk_tokens=16)
    assert max_err(clean, dirty) == 0.0


def test_cpu_default_backend_is_chunked() -> None:
    assert default_backend_name("cpu") == "chunked"
    assert default_backend_name("gpu") == "pallas-gpu"
    assert get_backend("chunked").fn is chunked_paged_attention


# --- (3) poisoned free pages must not change any result ------------------------------------------


def test_reference_ignores_poisoned_pages() -> None:
    # Huge finite, not NaN: the reference computes probs @ v densely, where 0 * NaN = NaN would
    # leak (the engine only ever leaves finite data in page 0 and freed pages).
    b = make_batch(MIXED_ROWS, hq=6, hkv=2, d=16, page=16, seed=6)
    clean = reference_paged_attention(*b.args(), scale=0.25)
    dirty = reference_paged_attention(*poisoned(b, 1e30).args(), scale=0.25)
    assert max_err(clean, dirty) == 0.0


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_pallas_ignores_poisoned_pages(value: float) -> None:
    b = make_batch(MIXED_ROWS, hq=6, hkv=2, d=16, page=16, seed=7)
    clean = pallas(b, 0.25)
    dirty = pallas(poisoned(b, value), 0.25)
    assert bool(jnp.all(jnp.isfinite(dirty)))
    assert max_err(clean, dirty) == 0.0


# --- backends ------------------------------------------------------------------------------------


def test_pallas_gpu_backend_runs_in_interpret_mode_on_cpu() -> None:
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the backend compiles for real; see bench/gpu_check.py")
    backend = get_backend("pallas-gpu")
    assert backend.name == "pallas-gpu"
    b = make_batch(((2, 9), (1, 4)), hq=2, hkv=1, d=16, page=16, seed=8)
    want = reference_paged_attention(*b.args(), scale=0.25)
    assert max_err(backend.fn(*b.args(), scale=0.25), want) <= F32_TOL


def test_pallas_tpu_falls_back_to_reference_off_tpu() -> None:
    if jax.default_backend() == "tpu":
        pytest.skip("on a TPU the real kernel is used")
    assert pallas_tpu.make_backend().name == "reference"


def test_pallas_tpu_layout_conversion() -> None:
    """The K/V interleave and query packing, checked with jax's pure-jnp ragged reference."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ref_ragged_paged_attention,
    )

    b = make_batch(MIXED_ROWS, hq=6, hkv=2, d=16, page=16, seed=9)
    want = reference_paged_attention(*b.args(), scale=0.25)
    got = pallas_tpu.tpu_ragged_paged_attention(
        *b.args(), scale=0.25, kernel=ref_ragged_paged_attention
    )
    assert max_err(got, want) <= F32_TOL
