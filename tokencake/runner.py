"""The real executor: runs a scheduler's :class:`~tokencake.scheduler.plan.StepPlan` on the
device, through one jitted step (model forward over the paged KV, then sampling).

* :class:`EngineExecutor` is what the step loop calls (``scheduler/core.py``'s ``Executor``;
  the simulated one is ``scheduler/sim_executor.py``): the plan's KV copies go to the transfer
  engine (when the host tier is on), its chunks become rows
  (:func:`~tokencake.step_inputs.rows_from_chunks`).
* :class:`ModelRunner` owns the model state and the device KV arrays. Shapes are padded to
  buckets so that every step reuses an executable compiled at warm-up (ahead of time, with
  ``jit.lower().compile()``); an unbucketed shape is a bug and raises instead of compiling
  mid-serving. Decode rows (one token) and prefill chunks run as two calls of the same step
  function with different bucket shapes, so a long prompt chunk does not pad every decode row
  to its length; with ``fused_steps`` a prefill chunk and the decode rows share one call that
  reads the weights once and still attends per group at each group's own shape
  (``StepBuckets.calls``, ``step_inputs.py``).
* :func:`~tokencake.sampler.sample` picks each row's token inside the jitted step, so only
  ``[S]`` ints (and the logprobs asked for) leave the device, not logits.
* Overlap scheduling (``tokencake/overlap.py``): :meth:`ModelRunner.dispatch` returns before
  the device finishes and can feed a row's last token from the previous step's device buffer
  (:class:`TokenFeed`); :meth:`ModelRunner.collect` reads the tokens.

The runner's configuration is ``runner_config.py``; measurements outside serving (step
timings, prompt logits) are ``diagnostics.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokencake import executable_cache
from tokencake.buckets import CallShape, Shape
from tokencake.memory.kv_cache import KVCacheSpec, allocate_kv_cache
from tokencake.memory.transfer import TransferEngine, TransferHandle
from tokencake.models import sharding
from tokencake.models.attention.backend import get_backend
from tokencake.models.config import ModelConfig
from tokencake.models.llama import Batch, DecoderLM
from tokencake.models.logits_adjust import LogitsAdjust, mask_words
from tokencake.row_controls import MAX_LOGIT_BIAS
from tokencake.runner_config import RunnerConfig, enable_compilation_cache
from tokencake.sampler import SampleOutput, SamplingInputs, sample
from tokencake.scheduler.copies import CopyTracker
from tokencake.scheduler.plan import BlockCopy, StepPlan
from tokencake.scheduler.request import PENDING_TOKEN, Request
from tokencake.step_inputs import (  # noqa: F401 (RowRequest, RowSampling: re-exported)
    CallInputs,
    RowRequest,
    RowSampling,
    abstract_batch,
    abstract_sampling,
    build_inputs,
    rows_from_chunks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


# ---- the executor behind the step loop -------------------------------------------------------
#: One request's sampling settings (from the engine's per-request state).
SamplingOf = Callable[[Request], RowSampling]


class EngineExecutor:
    """Runs plans on the device: copies through the transfer engine (when the host tier is
    on), then one jitted step over the paged KV."""

    def __init__(
        self,
        runner: ModelRunner,
        transfer: TransferEngine | None,
        copies: CopyTracker,
        sampling_of: SamplingOf,
    ) -> None:
        self.runner = runner
        self.transfer = transfer
        self.copies = copies  # the scheduler's tracker: its fences are checked before a step
        self.sampling_of = sampling_of
        self.samples: dict[str, SampledToken] = {}  # the last step's, with logprobs
        self._copy_of: dict[int, BlockCopy] = {}  # transfer handle id -> the plan's copy
        self._landed: list[TransferHandle] = []  # finished while waiting, not reported yet

    def execute(self, plan: StepPlan) -> dict[str, int]:
        self.samples = {}
        handle = self.dispatch(plan)
        if handle is None:
            return {}
        return {k: v.token for k, v in self.collect(handle).items()}

    def dispatch(
        self, plan: StepPlan, after: StepHandle | None = None, feed: bool = False
    ) -> StepHandle | None:
        """The first half of :meth:`execute`: issue the plan's copies and dispatch its
        compute without waiting for it (None without chunks). ``after``/``feed``: see
        :meth:`ModelRunner.dispatch` (overlap scheduling)."""
        # Copies go first: a copy-out must read pages before this step's writes, and JAX's
        # dataflow then orders them; the tracker's fences make that order not matter.
        self._issue(plan.copies)
        if not plan.chunks:
            if self.copies.in_flight and self.transfer is not None:
                # Nothing runnable until a copy lands: wait a little instead of spinning.
                self._landed += self.transfer.wait(timeout=0.01)
            return None
        rows = rows_from_chunks(plan.chunks, self.sampling_of)
        if self.transfer is not None:
            self._check_fences(plan)
        return self.runner.dispatch(rows, after, feed)

    def collect(self, handle: StepHandle) -> dict[str, SampledToken]:
        """The second half of :meth:`execute`: wait for the step and read its samples."""
        self.samples = self.runner.collect(handle)
        return self.samples

    def landed_copies(self) -> tuple[list[BlockCopy], list[BlockCopy]]:
        if self.transfer is None:
            return [], []
        finished, self._landed = self._landed + self.transfer.poll(), []
        done = [self._copy_of.pop(h.id) for h in finished if h.error is None]
        failed = [self._copy_of.pop(h.id) for h in finished if h.error is not None]
        return done, failed

    def wait_copies(self) -> None:
        """Block until every copy in flight has finished (reported by the next
        :meth:`landed_copies`)."""
        if self.transfer is not None:
            self._landed += self.transfer.wait()

    def _issue(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        if self.transfer is None:
            raise RuntimeError("the scheduler emitted KV copies but the host tier is off")
        for c in copies:
            h = self.transfer.issue(c.direction, c.device_blocks, c.host_blocks, c.tag)
            self._copy_of[h.id] = c

    def _check_fences(self, plan: StepPlan) -> None:
        bs = self.runner.cfg.page_size
        attended, written = [], []
        for c in plan.chunks:
            end = -(-(c.start + c.num_tokens) // bs)
            attended.append(c.request.block_ids[:end])
            written.append(c.request.block_ids[c.start // bs : end])
        self.copies.check_step(attended, written)


# ---- the model runner ------------------------------------------------------------------------
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
        self.attention_fn = self.backend.layer_fn()
        kv_sharding = None
        if cfg.tensor_parallel_size > 1:
            sharding.check_divisible(model_cfg, cfg.tensor_parallel_size)
            self.mesh = sharding.make_mesh(cfg.tensor_parallel_size)
            self.attention_fn = sharding.shard_attention(self.attention_fn, self.mesh)
            kv_sharding = sharding.kv_sharding(self.mesh)
        pack = cfg.pack_weights and self.mesh is None and jax.default_backend() == "cpu"
        model = DecoderLM(
            model_cfg, params, cfg.dtype, cfg.resolved_layer_loop(), self.mesh,
            pack_weights=pack, fuse_projections=cfg.fuse_projections,
            transpose_weights=cfg.resolved_transpose_weights(), weight_dtype=cfg.weight_dtype,
        )  # fmt: skip
        # Split once: the graph definition is static, the state is the only weight argument.
        # The state goes to the step as a flat list of arrays: flattening an nnx.State of the
        # per-layer weights (200+ leaves) costs about a millisecond per call, a list does not.
        self.graphdef, state = nnx.split(model)
        self.state, self._state_def = jax.tree_util.tree_flatten(state)
        self.k, self.v = allocate_kv_cache(self.kv_spec, kv_sharding)
        self._step = jax.jit(self._step_fn, donate_argnums=(1, 2))
        self._compiled: dict[CallShape, jax.stages.Compiled] = {}
        # Distinct tokens of a row's context never exceed its length nor the vocabulary, so
        # this capacity holds every penalized row without a per-request bucket.
        self.penalty_capacity = min(cfg.max_model_len, model_cfg.vocab_size)
        self._neutral: dict[int, LogitsAdjust] = {}  # row bucket -> no-op adjustment arrays
        self._neutral_dev: dict[int, LogitsAdjust] = {}  # the same, resident on the device
        # Slots of the device token buffer a step leaves for the next (overlap scheduling):
        # one per row of an iteration, which never has more rows than running requests.
        self.token_slots = cfg.max_num_seqs + cfg.max_prefill_seqs
        self._idle_feed: dict[int, TokenFeed] = {}
        self.compile_seconds = 0.0
        self.compile_times: dict[CallShape, float] = {}  # seconds each shape took to compile
        # Steps with prefill and decode rows, by whether they ran as one fused call
        # (``buckets.fused_steps``) or as separate calls (fusion off, or a mix outside the family).
        self.fused_counts = {"fused": 0, "unfused": 0}
        self.buckets = cfg.buckets  # how steps are split into calls (see set_fused_steps)
        self.strict = False  # after warm-up, a missing shape is an error
        self.channel = None  # multi-process leader: announces each step (tokencake.multihost)
        self.group = None  # multi-process, every process: waits for new compiles together

    # ---- the jitted step ---------------------------------------------------------------------
    def model(self, state: list[jax.Array]) -> DecoderLM:
        """The model over ``state`` (the runner's flat weight list, or traced stand-ins)."""
        return nnx.merge(self.graphdef, jax.tree_util.tree_unflatten(self._state_def, state))

    def _step_fn(
        self, state, k, v, batch: Batch | tuple[Batch, ...], sampling: SamplingInputs,
        adj: LogitsAdjust, feed: TokenFeed,
    ):  # fmt: skip
        """One call: a :class:`Batch`, or (fused) a tuple of group batches whose sampled rows
        follow each other in ``sampling``/``adj``/``feed`` order."""
        model = self.model(state)
        groups = (batch,) if isinstance(batch, Batch) else batch
        # Overlap scheduling: a row whose last input token was sampled by the step before
        # (still on the device when this one was planned) reads it from that step's buffer.
        fed = feed.prev[jnp.clip(feed.src, 0, feed.prev.shape[0] - 1)]
        fed_groups, picks, r0 = [], [], 0
        for g in groups:
            s = g.input_ids.shape[0]
            rows, last_col = jnp.arange(s), jnp.maximum(g.q_lens - 1, 0)
            src = feed.src[r0 : r0 + s]
            given = g.input_ids[rows, last_col]
            ids = g.input_ids.at[rows, last_col].set(jnp.where(src >= 0, fed[r0 : r0 + s], given))
            fed_groups.append(g._replace(input_ids=ids))
            picks.append((rows, last_col))
            r0 += s
        hidden, k, v = model(
            fed_groups[0] if isinstance(batch, Batch) else tuple(fed_groups), k, v,
            self.attention_fn,
        )  # fmt: skip
        hidden = (hidden,) if isinstance(batch, Batch) else hidden
        last = [h[rows, col] for h, (rows, col) in zip(hidden, picks, strict=True)]
        out = sample(
            model.logits(last[0] if len(last) == 1 else jnp.concatenate(last)), sampling, adj
        )
        tokens = feed.out.at[feed.dst].set(out.tokens, mode="drop")
        return out, tokens, k, v

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

    def idle_feed(self, rows: int) -> TokenFeed:
        """A feed that hands no token over and records none (every step without overlap)."""
        feed = self._idle_feed.get(rows)
        if feed is None:
            b = self.token_slots
            feed = TokenFeed(np.zeros((b,), np.int32), np.full((rows,), -1, np.int32),
                             np.zeros((b,), np.int32), np.full((rows,), b, np.int32))  # fmt: skip
            for a in feed:
                a.setflags(write=False)
            self._idle_feed[rows] = feed
        return feed

    def abstract_inputs(
        self, rows: int, q: int, pages: int
    ) -> tuple[Batch, SamplingInputs, LogitsAdjust]:
        """Shapes and dtypes of one step's host inputs for bucket ``(rows, q, pages)``."""
        a = jax.ShapeDtypeStruct
        adj = LogitsAdjust(*(a(x.shape, x.dtype) for x in self.neutral_adjust(rows)))
        return abstract_batch(rows, q, pages), abstract_sampling(rows), adj

    def compiled(self, shape: CallShape) -> jax.stages.Compiled:
        """The executable of a bucketed call shape, plain or fused (compiled now, unless
        warm-up did: after warm-up an unknown shape raises)."""
        if shape in self._compiled:
            return self._compiled[shape]
        if self.strict:
            raise RuntimeError(f"step shape {shape} was not compiled at warm-up (bucketing bug)")
        t0 = time.perf_counter()
        n = _call_rows(shape)
        a = jax.ShapeDtypeStruct
        batch = abstract_batch(*shape) if isinstance(shape[0], int) else tuple(
            abstract_batch(*g) for g in shape
        )  # fmt: skip
        samp = abstract_sampling(n)
        adj = LogitsAdjust(*(a(x.shape, x.dtype) for x in self.neutral_adjust(n)))
        feed = TokenFeed(*(a(x.shape, x.dtype) for x in self.idle_feed(n)))
        lowered = self._step.lower(self.state, self.k, self.v, batch, samp, adj, feed)
        compiled = executable_cache.compile_lowered(lowered, self.k)
        self.compile_times[shape] = time.perf_counter() - t0
        self.compile_seconds += self.compile_times[shape]
        self._compiled[shape] = compiled
        return compiled

    def warmup(self, progress: bool = False) -> None:
        """Compile every bucketed shape now; afterwards an unknown shape raises."""
        shapes: list[CallShape] = [*self.cfg.shapes(), *self.cfg.buckets.fused_shapes()]
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
            self.compiled(shape)
        self.strict = True
        log.info("warm-up compiled %d step shapes in %.1fs", len(shapes), self.compile_seconds)

    def set_fused_steps(self, on: bool) -> None:
        """Fuse mixed steps or not from now on. The configured state
        (``cfg.buckets.fused_steps``) is the initial one and must be on for ``on``: it puts the
        fused family in warm-up. Lets one runner compare both ways on the same weights and
        executables (bench/bench_engine.py --fused)."""
        if on and not self.cfg.buckets.fused_steps:
            raise ValueError("set_fused_steps(True) needs a runner built with fused_steps=True")
        self.buckets = dataclasses.replace(self.cfg.buckets, fused_steps=on)

    # ---- execution ------------------------------------------------------------------------
    def execute(self, rows: Sequence[RowRequest]) -> dict[str, SampledToken]:
        """Run all rows (decode and prefill chunks); return one sampled token per row."""
        return self.collect(self.dispatch(rows))

    def dispatch(
        self, rows: Sequence[RowRequest], after: StepHandle | None = None, feed: bool = False
    ) -> StepHandle:
        """Dispatch every call of a step over ``rows`` without waiting for any result (JAX
        dispatch is asynchronous), so the host builds a later call's inputs (grammar masks
        included), or plans the next step, while the device runs this one.

        ``feed`` (overlap scheduling): the step also leaves its sampled tokens in a device
        buffer (``StepHandle.tokens``), and a row whose last token is :data:`PENDING_TOKEN`
        takes that token from ``after``'s buffer (``after`` is the step dispatched before
        this one; its tokens need not be read yet)."""
        spans = [(r.start, len(r.token_ids)) for r in rows]
        handle = StepHandle([], None, {})
        slot = 0
        calls = self.buckets.calls(spans)
        if len({pf for c in calls for pf, _, _ in c.groups}) == 2:  # prefill and decode rows
            self.fused_counts["fused" if any(c.fused for c in calls) else "unfused"] += 1
        for call in calls:
            inputs = build_inputs(
                [([rows[i] for i in idx], shape) for _, idx, shape in call.groups],
                self.cfg.page_size, self.model_cfg.vocab_size,
            )  # fmt: skip
            tf = self.idle_feed(len(inputs.rows))
            if feed:
                tf, slot = self._feed(inputs.rows, after, handle, slot)
            res, tokens = self._dispatch_call(inputs, call.shape, tf)
            handle.groups.append((inputs.rows, res))
            if feed:
                handle.tokens = tokens
        return handle

    def collect(self, handle: StepHandle) -> dict[str, SampledToken]:
        """Read a dispatched step's sampled tokens (waits for the device)."""
        out: dict[str, SampledToken] = {}
        for group, res in handle.groups:
            res = SampleOutput(*_fetch(res))
            out.update(
                (r.request_id, SampledToken(int(res.tokens[i]), float(res.logprob[i]),
                                            res.top_ids[i], res.top_logprobs[i]))
                for i, r in enumerate(group) if r is not None
            )  # fmt: skip
        return out

    def _feed(
        self,
        group: Sequence[RowRequest | None],
        after: StepHandle | None,
        handle: StepHandle,
        slot: int,
    ) -> tuple[TokenFeed, int]:
        """The token feed of one call of an overlapped step: where each row's pending last
        token comes from (``after``'s slots) and which slot its sampled token goes to.
        ``group`` is the call's padded rows (None: padding)."""
        b, s = self.token_slots, len(group)
        src = np.full((s,), -1, np.int32)
        dst = np.full((s,), b, np.int32)  # out of range: dropped
        for i, r in enumerate(group):
            if r is None:
                continue
            if r.token_ids[-1] == PENDING_TOKEN:
                if after is None or r.request_id not in after.slots:
                    raise RuntimeError(
                        f"row {r.request_id!r} waits on a token no step in flight produces"
                    )
                src[i] = after.slots[r.request_id]
            if slot < b:
                dst[i] = handle.slots[r.request_id] = slot
                slot += 1
        zeros = self.idle_feed(s).out
        prev = after.tokens if after is not None and after.tokens is not None else zeros
        out = handle.tokens if handle.tokens is not None else zeros
        return TokenFeed(prev, src, out, dst), slot

    def _dispatch_call(
        self, inputs: CallInputs, shape: CallShape, feed: TokenFeed
    ) -> tuple[SampleOutput, jax.Array]:
        """Launch one call (plain or fused) on its host inputs; returns its device results."""
        r0 = 0
        for b in inputs.batches:
            s, neg = b.input_ids.shape[0], b.input_ids < 0
            if neg.any():  # only a fed row's last token may be pending (the step fills it in)
                src = np.asarray(feed.src[r0 : r0 + s])
                neg[np.arange(s), np.maximum(b.q_lens - 1, 0)] &= src < 0
                if neg.any():
                    raise RuntimeError("a row holds a pending token the step is not fed")
            r0 += s
        # numpy goes straight to the executable: jnp.asarray would compile a staging program per
        # new shape, which breaks the no-compilation-after-warm-up rule.
        batch = inputs.batches[0] if len(inputs.batches) == 1 else inputs.batches
        adj = self._adjust_inputs(inputs.rows)
        if self.channel is not None:  # the other processes launch the same call with these
            if len(inputs.batches) > 1:
                raise RuntimeError("fused steps are not supported across processes")
            self.channel.send_step(shape, (*batch, *inputs.sampling, *adj))  # (never fed)
        compiled = self._compiled_together(shape)  # (announced first: all compile at once)
        res, tokens, self.k, self.v = compiled(
            self.state, self.k, self.v, batch, inputs.sampling, adj, feed
        )
        return res, tokens

    def run_inputs(self, shape: Shape, arrays: Sequence[np.ndarray]) -> None:
        """A follower process: launch the compiled ``shape`` on the leader's flat inputs."""
        nb, ns = len(Batch._fields), len(SamplingInputs._fields)
        batch, samp = Batch(*arrays[:nb]), SamplingInputs(*arrays[nb : nb + ns])
        adj, feed = LogitsAdjust(*arrays[nb + ns :]), self.idle_feed(shape[0])
        compiled = self._compiled_together(shape)
        _, _, self.k, self.v = compiled(self.state, self.k, self.v, batch, samp, adj, feed)

    def _compiled_together(self, shape: CallShape) -> jax.stages.Compiled:
        """:meth:`compiled`; in a multi-process run a shape compiled just now is first waited
        for by every process (XLA:CPU's collectives give up on a peer still compiling after
        30 s). A shape compiled at warm-up needs no wait."""
        new = shape not in self._compiled
        compiled = self.compiled(shape)
        if new and self.group is not None:
            self.group.barrier(f"step/{shape}")
        return compiled

    def _adjust_inputs(self, rows: Sequence[RowRequest | None]) -> LogitsAdjust:
        """The call's adjustment arrays over its padded ``rows`` (None: padding): the shared
        neutral ones unless a row uses one."""
        s = len(rows)
        neutral = self.neutral_adjust(s)
        used = [
            (i, r.controls) for i, r in enumerate(rows) if r is not None and r.controls is not None
        ]
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


def _call_rows(shape: CallShape) -> int:
    """Sampled rows of a call: its shape's rows, summed over a fused call's groups."""
    return shape[0] if isinstance(shape[0], int) else sum(g[0] for g in shape)


def _fetch(res: SampleOutput) -> tuple[np.ndarray, ...]:
    """A step's outputs on the host. Across processes (multi-controller) they are replicated
    over devices this process cannot address, so each reads its own copy."""
    if all(x.is_fully_addressable for x in res):
        return jax.device_get(tuple(res))
    if not all(x.sharding.is_fully_replicated for x in res):
        raise RuntimeError("step outputs are not replicated: they cannot be read on one process")
    return tuple(np.asarray(x.addressable_data(0)) for x in res)


# ---- the overlap hand-off -----------------------------------------------------------------
class TokenFeed(NamedTuple):
    """Overlap scheduling's device-side hand-off of sampled tokens from one step to the next,
    so the host need not read them before dispatching the next step. ``B`` is
    ``ModelRunner.token_slots``."""

    prev: jax.Array  # [B] i32: the step before's sampled tokens, by slot
    src: jax.Array  # [S] i32: slot of ``prev`` holding the row's last input token, -1 none
    out: jax.Array  # [B] i32: this step's token buffer so far (its earlier calls' tokens)
    dst: jax.Array  # [S] i32: slot the row's sampled token goes to (B: none)


@dataclass
class StepHandle:
    """A dispatched step: its calls' rows and device results (read by
    :meth:`ModelRunner.collect`) and, when fed, its token buffer and each row's slot."""

    groups: list[tuple[list[RowRequest | None], SampleOutput]]  # padded rows (None: padding)
    tokens: jax.Array | None  # [B] the step's sampled tokens by slot (None unless fed)
    slots: dict[str, int]  # request id -> its slot in ``tokens``
