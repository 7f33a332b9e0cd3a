"""The real executor: runs a scheduler's chunks through the jitted step over the paged KV.

It owns the device KV arrays. Shapes are padded to buckets so that every step reuses an
executable compiled at warm-up (ahead of time, with ``jit.lower().compile()``); an unbucketed
shape is a bug and raises instead of compiling mid-serving. Decode rows (one token) and prefill
chunks run as two calls of the same step function with different bucket shapes, so a long
prompt chunk does not pad every decode row to its length.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokencake.buckets import Shape, StepBuckets
from tokencake.memory.kv_cache import DUMMY_PAGE, KVCacheSpec, allocate_kv_cache
from tokencake.models import sharding
from tokencake.models.attention.backend import get_backend
from tokencake.models.config import ModelConfig
from tokencake.models.llama import Batch, DecoderLM
from tokencake.models.logits_adjust import LogitsAdjust, mask_words
from tokencake.models.sampler import SampleOutput, SamplingInputs, sample
from tokencake.row_controls import MAX_LOGIT_BIAS, RowControls
from tokencake.scheduler.plan import ScheduledChunk
from tokencake.scheduler.request import Request

log = logging.getLogger(__name__)


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache so restarts skip most of warm-up.

    ``path`` defaults to ``$TOKENCAKE_XLA_CACHE`` or ``~/.cache/tokencake/xla``; an empty
    ``TOKENCAKE_XLA_CACHE`` disables it. Returns the directory used (None when disabled).
    """
    import os

    if path is None:
        path = os.environ.get("TOKENCAKE_XLA_CACHE")
        if path is None:
            path = os.path.join(os.path.expanduser("~"), ".cache", "tokencake", "xla")
    if not path:
        return None
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return jax.config.jax_compilation_cache_dir


@dataclass(frozen=True)
class RunnerConfig:
    """Static shapes of the executor. Bucket tuples are ascending; the last is the maximum."""

    num_pages: int
    page_size: int = 16
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_prefill_chunk: int = 512
    max_prefill_seqs: int = 4
    dtype: str = "float32"
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.num_pages < 2:
            raise ValueError("RunnerConfig needs page_size >= 1 and num_pages >= 2")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @cached_property
    def buckets(self) -> StepBuckets:
        """The step shape buckets of this configuration (shared with the simulator)."""
        return StepBuckets(self.page_size, self.max_model_len, self.max_num_seqs,
                           self.max_prefill_chunk, self.max_prefill_seqs)  # fmt: skip

    @property
    def max_pages_per_seq(self) -> int:
        return self.buckets.max_pages_per_seq

    @property
    def decode_row_buckets(self) -> tuple[int, ...]:
        return self.buckets.decode_row_buckets

    @property
    def prefill_row_buckets(self) -> tuple[int, ...]:
        return self.buckets.prefill_row_buckets

    @property
    def prefill_token_buckets(self) -> tuple[int, ...]:
        return self.buckets.prefill_token_buckets

    @property
    def page_buckets(self) -> tuple[int, ...]:
        return self.buckets.page_buckets

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens per row, pages per row) the runner compiles."""
        return self.buckets.shapes()


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


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class ModelRunner:
    """Owns the model state and the KV cache; executes batches with precompiled steps."""

    def __init__(
        self, model_cfg: ModelConfig, params: dict[str, np.ndarray], cfg: RunnerConfig
    ) -> None:
        self.model_cfg = model_cfg
        self.cfg = cfg
        enable_compilation_cache()
        self.backend = get_backend(cfg.attention_backend)
        self.kv_spec = KVCacheSpec(
            model_cfg.num_layers, cfg.num_pages, cfg.page_size, model_cfg.num_kv_heads,
            model_cfg.head_dim, cfg.dtype,
        )  # fmt: skip
        self.mesh = None
        self.attention_fn = self.backend.fn
        kv_sharding = None
        if cfg.tensor_parallel_size > 1:
            sharding.check_divisible(model_cfg, cfg.tensor_parallel_size)
            self.mesh = sharding.make_mesh(cfg.tensor_parallel_size)
            params = sharding.shard_params(params, self.mesh, cfg.dtype)
            self.attention_fn = sharding.shard_attention(self.backend.fn, self.mesh)
            kv_sharding = sharding.kv_sharding(self.mesh)
        model = DecoderLM(model_cfg, params, cfg.dtype)
        # Split once: the graph definition is static, the state is the only weight argument.
        self.graphdef, self.state = nnx.split(model)
        self.k, self.v = allocate_kv_cache(self.kv_spec, kv_sharding)
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2))
        self._compiled: dict[tuple[int, int, int], jax.stages.Compiled] = {}
        # Distinct tokens of a row's context never exceed its length nor the vocabulary, so
        # this capacity holds every penalized row without a per-request bucket.
        self.penalty_capacity = min(cfg.max_model_len, model_cfg.vocab_size)
        self._neutral: dict[int, LogitsAdjust] = {}  # row bucket -> no-op adjustment arrays
        self._neutral_dev: dict[int, LogitsAdjust] = {}  # the same, resident on the device
        self.compile_seconds = 0.0
        self.strict = False  # after warm-up, a missing shape is an error

    # ---- the jitted step ---------------------------------------------------------------------
    def _step_fn(self, state, k, v, batch: Batch, sampling: SamplingInputs, adj: LogitsAdjust):
        model = nnx.merge(self.graphdef, state)
        hidden, k, v = model(batch, k, v, self.attention_fn)
        rows = jnp.arange(hidden.shape[0])
        last = hidden[rows, jnp.maximum(batch.q_lens - 1, 0)]
        out = sample(model.logits(last), sampling, adj)
        return out, k, v

    def neutral_adjust(self, rows: int) -> LogitsAdjust:
        """The no-op adjustment arrays of a row bucket, built once and reused by every step
        whose rows use no penalty, bias or grammar (so those steps do no extra host work)."""
        adj = self._neutral.get(rows)
        if adj is None:
            v, pc = self.model_cfg.vocab_size, self.penalty_capacity
            zf, one = np.zeros((rows,), np.float32), np.ones((rows,), np.float32)
            adj = LogitsAdjust(
                np.full((rows, mask_words(v)), -1, np.int32),
                np.zeros((rows, MAX_LOGIT_BIAS), np.int32),
                np.zeros((rows, MAX_LOGIT_BIAS), np.float32),
                np.full((rows, pc), v, np.int32),
                np.zeros((rows, pc), np.float32),
                zf, zf, one,
            )  # fmt: skip
            for a in adj:
                a.setflags(write=False)  # shared by every step: a stray write would leak
            self._neutral[rows] = adj
        return adj

    def _abstract_inputs(
        self, rows: int, q: int, pages: int
    ) -> tuple[Batch, SamplingInputs, LogitsAdjust]:
        i32 = jax.ShapeDtypeStruct
        batch = Batch(
            i32((rows, q), jnp.int32), i32((rows, q), jnp.int32), i32((rows,), jnp.int32),
            i32((rows,), jnp.int32), i32((rows, pages), jnp.int32),
        )  # fmt: skip
        samp = SamplingInputs(
            i32((rows,), jnp.float32), i32((rows,), jnp.int32), i32((rows,), jnp.float32),
            i32((rows,), jnp.int32), i32((rows,), jnp.int32), i32((rows,), jnp.int32),
            i32((rows,), jnp.float32),
        )  # fmt: skip
        adj = LogitsAdjust(*(i32(a.shape, a.dtype) for a in self.neutral_adjust(rows)))
        return batch, samp, adj

    def _compile(self, shape: tuple[int, int, int]) -> jax.stages.Compiled:
        if shape in self._compiled:
            return self._compiled[shape]
        if self.strict:
            raise RuntimeError(f"step shape {shape} was not compiled at warm-up (bucketing bug)")
        t0 = time.perf_counter()
        batch, samp, adj = self._abstract_inputs(*shape)
        compiled = self._step.lower(self.state, self.k, self.v, batch, samp, adj).compile()
        self.compile_seconds += time.perf_counter() - t0
        self._compiled[shape] = compiled
        return compiled

    def warmup(self, progress: bool = False) -> None:
        """Compile every bucketed shape now; afterwards an unknown shape raises."""
        shapes = self.cfg.shapes()
        it = shapes
        if progress:
            import sys

            from tqdm import tqdm

            cache = jax.config.jax_compilation_cache_dir
            note = (
                f"the first start compiles them, later starts read them from the cache in {cache}"
                if cache
                else "no compilation cache (TOKENCAKE_XLA_CACHE is empty): every start compiles"
            )
            print(f"warming up {len(shapes)} step shapes: {note}", file=sys.stderr, flush=True)
            it = tqdm(shapes, desc="compiling step shapes", unit="shape", file=sys.stderr)
        for shape in it:
            self._compile(shape)
        self.strict = True
        log.info("warm-up compiled %d step shapes in %.1fs", len(shapes), self.compile_seconds)

    # ---- diagnostics -----------------------------------------------------------------------
    def time_shape(self, shape: Shape, repeats: int = 3) -> float:
        """Median seconds of one call of the compiled ``shape`` on padding input: every row
        has one token and every page-table entry is the dummy page, so no live KV is touched.
        On XLA:CPU a call costs what its padded shape costs, less the cache misses of
        gathering live pages, which the simulator prices separately (per context token)."""
        s, q, p = shape
        zi, zf, one = np.zeros((s,), np.int32), np.zeros((s,), np.float32), np.ones((s,), np.int32)
        batch = Batch(np.zeros((s, q), np.int32), np.zeros((s, q), np.int32), one, one,
                      np.full((s, p), DUMMY_PAGE, np.int32))  # fmt: skip
        samp = SamplingInputs(zf, zi, np.ones((s,), np.float32), zi, zi, zi, zf)
        adj = self.neutral_adjust(s)
        compiled = self._compile(shape)
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            res, self.k, self.v = compiled(self.state, self.k, self.v, batch, samp, adj)
            jax.block_until_ready(res)
            if i:  # the first call pays one-off allocation
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def recompute_samples(self, repeats: int = 2) -> list[tuple[int, int, float]]:
        """``(new tokens, context, seconds)`` of prefill chunks of a few bucketed shapes, best
        of ``repeats`` (what ``CostModel.fit_recompute`` fits). Rows point every page at the
        dummy page, so no live KV is touched. Call after warm-up."""
        cfg = self.cfg
        token_sizes = sorted(
            {min(t, cfg.max_prefill_chunk) for t in (32, 128, cfg.max_prefill_chunk)}
        )
        samples = []
        for n in token_sizes:
            for ctx in sorted({0, min(4 * n, cfg.max_model_len - n)}):
                pages = -(-(ctx + n) // cfg.page_size)
                row = RowRequest("_profile", [0] * n, ctx, [DUMMY_PAGE] * pages, 0.0, 0, 1.0, 0, 0)
                self.execute([row])  # first call pays any lazy work; not timed
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self.execute([row])
                    best = min(best, time.perf_counter() - t0)
                samples.append((n, ctx, best))
        return samples

    def prompt_logits(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits ``[len(token_ids), V]`` for every position of one prompt.

        For correctness checks against reference implementations, not for serving: it compiles
        its own program for the prompt's shape and writes the prompt's KV into ``block_ids``.
        """
        n = len(token_ids)
        pages = math.ceil(n / self.cfg.page_size)
        if len(block_ids) < pages:
            raise ValueError(f"need {pages} blocks for {n} tokens, got {len(block_ids)}")

        def run(state, k, v, batch):
            model = nnx.merge(self.graphdef, state)
            hidden, k, v = model(batch, k, v, self.attention_fn)
            return model.logits(hidden[0]), k, v

        batch = Batch(
            np.asarray([token_ids], np.int32), np.arange(n, dtype=np.int32)[None],
            np.asarray([n], np.int32), np.asarray([n], np.int32),
            np.asarray([list(block_ids[:pages])], np.int32),
        )  # fmt: skip
        logits, self.k, self.v = jax.jit(run, donate_argnums=(1, 2))(
            self.state, self.k, self.v, batch
        )
        return np.asarray(logits)

    # ---- execution ------------------------------------------------------------------------
    def execute(self, rows: Sequence[RowRequest]) -> dict[str, SampledToken]:
        """Run all rows (decode and prefill chunks); return one sampled token per row.

        Every call is dispatched before any result is read (JAX dispatch is asynchronous), so
        the host builds a later call's inputs (grammar masks included) while the device runs
        the earlier one."""
        buckets = self.cfg.buckets
        spans = [(r.start, len(r.token_ids)) for r in rows]
        pending = []
        for prefill, idx in buckets.split(spans):
            group = [rows[i] for i in idx]
            shape = buckets.group_shape([spans[i] for i in idx], prefill)
            pending.append((group, self._dispatch_group(group, shape)))
        out: dict[str, SampledToken] = {}
        for group, res in pending:
            res = SampleOutput(*jax.device_get(tuple(res)))
            out.update(
                (r.request_id, SampledToken(int(res.tokens[i]), float(res.logprob[i]),
                                            res.top_ids[i], res.top_logprobs[i]))
                for i, r in enumerate(group)
            )  # fmt: skip
        return out

    def _dispatch_group(self, rows: Sequence[RowRequest], shape: Shape) -> SampleOutput:
        s, q, p = shape
        ids = np.zeros((s, q), np.int32)
        pos = np.zeros((s, q), np.int32)
        q_lens = np.zeros((s,), np.int32)
        kv_lens = np.zeros((s,), np.int32)
        tables = np.full((s, p), DUMMY_PAGE, np.int32)
        temp = np.zeros((s,), np.float32)
        top_k = np.zeros((s,), np.int32)
        top_p = np.ones((s,), np.float32)
        seeds = np.zeros((s,), np.int32)
        counters = np.zeros((s,), np.int32)
        want_top = np.zeros((s,), np.int32)
        min_p = np.zeros((s,), np.float32)
        for i, r in enumerate(rows):
            n = len(r.token_ids)
            ids[i, :n] = r.token_ids
            pos[i, :n] = np.arange(r.start, r.start + n)
            q_lens[i] = n
            kv_lens[i] = r.start + n
            nb = math.ceil((r.start + n) / self.cfg.page_size)
            tables[i, :nb] = r.block_ids[:nb]
            temp[i], top_k[i], top_p[i] = (
                r.temperature,
                min(r.top_k, self.model_cfg.vocab_size),
                r.top_p,
            )
            seeds[i], counters[i], want_top[i] = r.seed, r.counter, r.want_top
            min_p[i] = r.min_p
        compiled = self._compile((s, q, p))
        # numpy goes straight to the executable: jnp.asarray would compile a staging program per
        # new shape, which breaks the no-compilation-after-warm-up rule.
        batch = Batch(ids, pos, q_lens, kv_lens, tables)
        samp = SamplingInputs(temp, top_k, top_p, seeds, counters, want_top, min_p)
        adj = self._adjust_inputs(rows, s)
        res, self.k, self.v = compiled(self.state, self.k, self.v, batch, samp, adj)
        return res

    def _adjust_inputs(self, rows: Sequence[RowRequest], s: int) -> LogitsAdjust:
        """The group's adjustment arrays: the shared neutral ones unless a row uses one."""
        neutral = self.neutral_adjust(s)
        used = [(i, r.controls) for i, r in enumerate(rows) if r.controls is not None]
        if not used:
            if self.mesh is not None:  # let the executable place them on its mesh
                return neutral
            # Kept on the device: a plain step transfers nothing for them (~0.8 MB at S=32).
            dev = self._neutral_dev.get(s)
            if dev is None:
                dev = self._neutral_dev[s] = LogitsAdjust(*jax.device_put(tuple(neutral)))
            return dev
        adj = LogitsAdjust(*(a.copy() for a in neutral))
        for i, c in used:
            c.fill(i, adj)
        return adj


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
