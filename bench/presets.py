"""Simulator presets: pool geometry, scheduler limits, step-time and transfer models.

Four presets:

* ``local`` — this engine with the default model (SmolLM2-135M, float32) on this machine's
  CPUs. Its step-time coefficients come from ``python -m bench.calibrate``, which times real
  engine steps and writes ``bench/local_preset.json`` (committed). The same file fixes the
  engine configuration the real-engine runs use (``local_engine_kwargs``), so the simulator
  and the engine see the same pool, block size and batch limits.
* ``a800-qwen2.5-14b`` — the authors' setting (paper digest §7.2) with step times derived
  from public hardware and model figures; see :func:`a800_qwen25_14b` for every assumption.
* ``h100-llama3.1-8b`` — a second accelerator and model the development runs never used
  (a check on hardware nobody tuned for): the same KV bytes as the authors' pool, with the
  prices of an H100 and Llama-3.1-8B from public figures; see :func:`h100_llama31_8b`.
  ``h100-llama3.1-8b-pressure`` is the same with the authors' 3,049 blocks (the same tokens,
  so the same pressure).

A step costs (seconds)::

    mem     = m0 + d * decode_context_tokens
    compute = b * decode_rows + c * prefill_tokens + e * sum(prefill_tokens * attended_ctx)
    step    = a + (max(mem, compute) if roofline else mem + compute)

``attended_ctx`` of a prefill chunk is ``start + n / 2`` (causal attention). Copies either
overlap the step (an async copy stream: ``step = max(step, copies)``) or add to it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tokencake.buckets import CallShape, StepBuckets
from tokencake.memory.cost_model import CostModel
from tokencake.scheduler.core import SchedulerConfig
from tokencake.scheduler.plan import StepPlan
from tokencake.scheduler.sim_executor import SimClock, SimExecutor, fake_token

LOCAL_PRESET_PATH = Path(__file__).with_name("local_preset.json")


def plan_spans(plan: StepPlan) -> list[tuple[int, int]]:
    """``(start, num_tokens)`` of every chunk: what the runner's call shapes follow."""
    return [(ch.start, ch.num_tokens) for ch in plan.chunks]


def linear_features(plan: StepPlan) -> list[float]:
    """The linear model's features: [1, decode rows, prefill tokens, decode context,
    prefill tokens x attended context] (a prefill chunk attends ``start + n / 2`` on average)."""
    rows = prefill = ctx = 0
    pctx = 0.0
    for ch in plan.chunks:
        if ch.num_tokens == 1 and ch.start >= ch.request.num_prompt_tokens:  # a decode row
            rows += 1
            ctx += ch.start + 1
        else:
            prefill += ch.num_tokens
            pctx += ch.num_tokens * (ch.start + ch.num_tokens / 2)
    return [1.0, rows, prefill, ctx, pctx]


def shape_key(shape: CallShape) -> str:
    """JSON key of a call shape in a preset's ``shape_s`` table (a fused call's two group
    shapes joined by ``+``)."""
    if isinstance(shape[0], int):
        return ",".join(map(str, shape))
    return "+".join(shape_key(g) for g in shape)


@dataclass(frozen=True)
class StepModel:
    """Step-time coefficients (see the module docstring)."""

    a: float  # fixed per-step overhead, s
    b: float  # per decode row, s
    c: float  # per prefill token, s
    d: float  # per context token read by a decode row, s
    e: float  # per prefill token x attended context token, s
    m0: float = 0.0  # weight read per step (roofline only), s
    roofline: bool = False
    idle: float = 1e-3  # an empty step still lets time pass
    # Measured price of each compiled call shape ("rows,tokens,pages" -> s). When present (the
    # calibrated local preset), a step costs its calls, grouped and padded exactly as the
    # runner does, plus a per-step and per-row overhead; the linear terms above then serve
    # only the recompute-cost model.
    shape_s: dict[str, float] = field(default_factory=dict)
    # The same shapes timed with every row's context at its page bucket's full span. The
    # chunked attention (the CPU default) walks keys up to the longest row of a call, so a
    # call's attention grows with that row's context: a call is priced between its two
    # prices, linearly in that context (absent: every call costs its ``shape_s`` price, as
    # under the reference backend, which attends the whole padded bucket anyway).
    shape_full_s: dict[str, float] = field(default_factory=dict)
    buckets: StepBuckets | None = None
    overhead: float = 0.0  # per non-empty step, beyond its calls (scheduling, batch building)
    overhead_row: float = 0.0  # per scheduled row
    overhead_ctx: float = 0.0  # per live context token a row's attention gathers (cache misses)

    def step_time(self, plan: StepPlan) -> float:
        if not plan.chunks:
            return self.idle
        if self.shape_s and self.buckets is not None:
            return self.spans_time(plan_spans(plan))
        _, rows, prefill, ctx, pctx = linear_features(plan)
        mem = self.m0 + self.d * ctx
        compute = self.b * rows + self.c * prefill + self.e * pctx
        return self.a + (max(mem, compute) if self.roofline else mem + compute)

    def scaled(self, factor: float) -> StepModel:
        """The same model with every price multiplied by ``factor`` (a machine that runs the
        same calls ``factor`` times slower); the empty step's ``idle`` is not a price."""
        return replace(
            self,
            a=self.a * factor, b=self.b * factor, c=self.c * factor, d=self.d * factor,
            e=self.e * factor, m0=self.m0 * factor,
            shape_s={k: v * factor for k, v in self.shape_s.items()},
            shape_full_s={k: v * factor for k, v in self.shape_full_s.items()},
            overhead=self.overhead * factor, overhead_row=self.overhead_row * factor,
            overhead_ctx=self.overhead_ctx * factor,
        )  # fmt: skip

    def spans_time(self, spans: list[tuple[int, int]]) -> float:
        """Seconds of a non-empty step over ``spans`` (``(start, num_tokens)`` per row) under
        the shape-priced model: its calls plus the fitted overheads."""
        return (
            self.overhead
            + self.overhead_row * len(spans)
            + self.overhead_ctx * sum(start + n for start, n in spans)
            + self.calls_time(spans)
        )

    def calls_time(self, spans: list[tuple[int, int]]) -> float:
        """Seconds of the runner's calls for a step over ``spans`` (see :func:`price_calls`)."""
        assert self.buckets is not None
        return price_calls(self.buckets, self.shape_s, self.shape_full_s, spans)


def price_calls(
    buckets: StepBuckets,
    shape_s: dict[str, float],
    shape_full_s: dict[str, float],
    spans: list[tuple[int, int]],
) -> float:
    """Seconds of the runner's calls for a step over ``spans`` (``(start, num_tokens)`` of
    each row), grouped and padded as the runner does (``buckets``), each priced by its
    shape's measured time ``shape_s`` and, towards ``shape_full_s`` (the same shape with every
    row at its page bucket's full span), by the context of its longest row."""
    page, limit = buckets.page_size, buckets.max_model_len
    total = 0.0
    for call in buckets.calls(spans):
        key = shape_key(call.shape)
        t = shape_s.get(key)
        if t is None:
            raise KeyError(
                f"call shape {key} has no measured price in this preset (a preset "
                "calibrated without fused_steps cannot price a fused engine; recalibrate)"
            )
        full = shape_full_s.get(key, t)
        if full > t:
            # The share of the full span the longest row reaches, over the call's groups
            # (a fused call's two groups share one price pair: the larger share is used).
            share = 0.0
            for _, rows, (_, _, pages) in call.groups:
                span = min(pages * page, limit)
                longest = max(spans[i][0] + spans[i][1] for i in rows)
                share = max(share, (longest - 1) / max(1, span - 1))
            t += (full - t) * min(1.0, share)
        total += t
    return total


@dataclass(frozen=True)
class Preset:
    """Everything the simulator needs to stand in for one engine + hardware."""

    name: str
    block_size: int
    num_blocks: int  # usable device KV blocks (the dummy page is extra)
    host_blocks: int
    bytes_per_token: int
    bandwidth: float  # bytes/s per direction
    step: StepModel
    max_num_seqs: int
    max_num_batched_tokens: int
    max_prefill_chunk: int
    max_prefill_seqs: int
    max_model_len: int
    overlap_copies: bool = True
    vocab_size: int = 32000
    notes: dict[str, Any] = field(default_factory=dict)

    def at_speed(self, factor: float) -> Preset:
        """This preset on a machine whose steps take ``factor`` times their calibrated prices
        (``bench.speed_check``); copies keep their bandwidth."""
        if not factor > 0:
            raise ValueError(f"speed factor must be > 0, got {factor}")
        return replace(self, step=self.step.scaled(factor), name=f"{self.name} (x{factor:.3f})")

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_prefill_chunk=self.max_prefill_chunk,
            max_prefill_seqs=self.max_prefill_seqs,
            max_model_len=self.max_model_len,
        )

    def cost_model(self) -> CostModel:
        """The cost model the policies see: transfers at ``bandwidth``, recompute from the
        step model's prefill terms (what a profile of this hardware would fit) and, on a
        roofline step model, the step's cost floor."""
        s = self.step
        cost = CostModel.fixed(self.bytes_per_block, self.bandwidth, 0.0, (s.a, s.c, s.e))
        if s.roofline:  # a step costs at least its overhead and its weight and KV reads
            cost.step_floor_s, cost.step_floor_ctx_s = s.a + s.m0, s.d
        return cost

    def executor(self, clock: SimClock, cost: CostModel, vocab_size: int) -> PresetExecutor:
        return PresetExecutor(clock, self, cost, vocab_size)


class PresetExecutor(SimExecutor):
    """:class:`SimExecutor` with a preset's step model and copy overlap."""

    def __init__(self, clock: SimClock, preset: Preset, cost: CostModel, vocab_size: int) -> None:
        super().__init__(clock, cost, vocab_size=vocab_size)
        self.preset = preset

    def execute(self, plan: StepPlan) -> dict[str, int]:
        out = {
            ch.request.request_id: fake_token(ch.request.all_token_ids, self.vocab_size)
            for ch in plan.chunks
            if ch.samples
        }
        dt = self.preset.step.step_time(plan)
        copy_s = sum(self.cost.copy_time(len(c.device_blocks), c.direction) for c in plan.copies)
        dt = max(dt, copy_s) if self.preset.overlap_copies else dt + copy_s
        self.completed.extend(plan.copies)
        self.last_step_s = dt
        self.clock.advance(dt)
        return out


def a800_qwen25_14b() -> Preset:
    """The authors' A800 / Qwen2.5-14B-Instruct setting (paper digest §7.2).

    Given by the authors: 3,050 GPU KV blocks of 16 tokens (one is vLLM's null block, so
    3,049 usable), 196,608 bytes of KV per token (48 layers x 8 KV heads x 128 dims x 2 (K, V)
    x 2 bytes), a 12 GB/s transfer prior, an 8,192-token batch budget with chunked prefill,
    32,768-token context, 100 GiB of CPU KV.

    Derived from public figures (assumptions, none fitted to the authors' results):

    1. A800-SXM4-80GB = A100 silicon: 2,039 GB/s HBM2e, 312 TFLOP/s dense BF16.
    2. Qwen2.5-14B: 14.7 B parameters = 29.5 GB of BF16 weights read once per step; 13.1 B
       non-embedding parameters -> 26.2 GFLOP per token (2 x params; logits only for
       sampled rows, ignored).
    3. Achieved fractions: 80 % of peak HBM bandwidth for weight and KV reads (typical of
       vLLM decode kernels) and **72 % of peak tensor throughput (225 TFLOP/s)** for the
       GEMMs and flash attention of prefill. The latter is a public measurement: Dao,
       "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
       (arXiv:2307.08691, 2023) reports end-to-end training of GPT-style models on A100 at
       up to 225 TFLOP/s per GPU, "72% model FLOPs utilization", with the same kernels
       vLLM's prefill uses (FlashAttention-2 forward, cuBLAS GEMMs) on token batches of the
       same size (2k-8k tokens per sequence; our prefill chunks are up to 8,192 tokens).
       (Earlier versions of this preset assumed 50 %, which made prefill ~1.4x too slow.)
    4. Hence ``m0`` = 29.5 GB / 1.63 TB/s = 18.1 ms (weight read), ``d`` = 196,608 B / 1.63
       TB/s = 0.12 µs per context token a decode row reads, ``b = c`` = 26.2 GFLOP / 225
       TFLOP/s = 0.117 ms per token of compute, ``e`` = 4 x 48 layers x 5,120 (40 heads x
       128) FLOP / 225 TFLOP/s = 4.4 ns per token x attended-context token.
    5. Roofline per step: ``max(memory, compute)`` (decode hides in the weight read,
       prefill is compute bound) plus ``a`` = 2 ms of per-step overhead (scheduling,
       sampling, launches; vLLM V1 with CUDA graphs and async scheduling).
    6. Transfers: the 12 GB/s prior both ways with 3 µs per block, on a separate stream
       (overlapping compute), as the authors' engine does.
    7. vLLM's default ``max_num_seqs`` 256; no per-step cap on prefill rows (64 here);
       one request may use the whole 8,192-token budget.
    8. Tokens of the authors' texts: 3.85 characters per token (their own counts; see
       ``bench.driver.SIM_CHARS_PER_TOKEN``).
    """
    hbm = 2.039e12 * 0.80
    flops = 312e12 * 0.72  # FlashAttention-2's measured 72 % MFU on A100 (see 3.)
    return _gpu_preset(
        "a800-qwen2.5-14b",
        num_blocks=3049,
        kv_token=196_608,
        bandwidth=12e9,
        hbm=hbm,
        flops=flops,
        flop_token=26.2e9,
        attn_flop_pair=4 * 48 * 5120,
        weight_bytes=29.5e9,
        vocab_size=152_064,
        source="a800_qwen25_14b",
    )


def h100_llama31_8b(same_tokens: bool = False) -> Preset:
    """An H100 / Llama-3.1-8B-Instruct setting: hardware and a model the development runs
    never used, so a check of the policies on prices nobody tuned for.

    From public figures (assumptions, none fitted to any result of ours):

    1. H100-SXM5-80GB: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16, PCIe 5.0 x16 to the host
       (64 GB/s per direction).
    2. Llama-3.1-8B: 8.03 B parameters = 16.1 GB of BF16 weights read once per step; 7.50 B
       parameters besides the input embedding (128,256 x 4,096) -> 15.0 GFLOP per token;
       32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 131,072 bytes of KV per token;
       32 query heads x 128 = 4,096 attention width.
    3. Achieved fractions: 80 % of peak HBM bandwidth for weight and KV reads (as the A800
       preset) and **43 % of peak tensor throughput** for prefill, the BF16 model FLOPs
       utilization Meta reports for Llama 3 training on H100s (Llama Team, "The Llama 3 Herd
       of Models", arXiv:2407.21783, 2024, Table 4: 38-43 %). That figure includes
       multi-GPU communication, so it prices prefill on the slow side; FlashAttention-3
       (arXiv:2407.08608) reaches 75 % in the attention kernel alone.
    4. Transfers: the authors' 12 GB/s prior is 37.5 % of PCIe 4.0 x16 (32 GB/s); the same
       fraction of PCIe 5.0 gives 24 GB/s, with copies overlapping compute.
    5. KV pool: the authors' KV bytes (3,049 blocks x 16 tokens x 196,608 B = 9.6 GB, a pool
       sized to put the workload under pressure) at this model's 131,072 B a token: 4,573
       blocks (73k tokens); 100 GiB of host KV; the same scheduler limits (vLLM's defaults,
       an 8,192-token budget, 32,768-token context) and 2 ms of per-step overhead.

    ``same_tokens`` (the ``h100-llama3.1-8b-pressure`` preset) keeps the authors' 3,049
    blocks instead: the same tokens, so the same memory pressure on the same workload, with
    only the prices changed. With the same bytes, most generator runs have no pressure left
    and every policy ties (bench/RESULTS.md, eighteenth round).
    """
    hbm = 3.35e12 * 0.80
    flops = 989e12 * 0.43  # Llama 3's reported BF16 MFU on H100 (see 3.)
    kv_token = 32 * 8 * 128 * 2 * 2
    pool_bytes = 3049 * 16 * 196_608  # the authors' device KV (a800_qwen25_14b)
    return _gpu_preset(
        "h100-llama3.1-8b-pressure" if same_tokens else "h100-llama3.1-8b",
        num_blocks=3049 if same_tokens else pool_bytes // (16 * kv_token),
        kv_token=kv_token,
        bandwidth=24e9,
        hbm=hbm,
        flops=flops,
        flop_token=15.0e9,
        attn_flop_pair=4 * 32 * 4096,
        weight_bytes=16.1e9,
        vocab_size=128_256,
        source="h100_llama31_8b",
    )


def _gpu_preset(
    name: str,
    *,
    num_blocks: int,
    kv_token: int,
    bandwidth: float,
    hbm: float,
    flops: float,
    flop_token: float,
    attn_flop_pair: float,
    weight_bytes: float,
    vocab_size: int,
    source: str,
) -> Preset:
    """A paper-scale accelerator preset: a roofline step over the achieved ``hbm`` bytes/s
    and ``flops`` (weights read once a step, ``kv_token`` bytes a context token, ``flop_token``
    a computed token, ``attn_flop_pair`` a query x key pair), 2 ms of per-step overhead,
    16-token blocks, 100 GiB of host KV, and vLLM's default scheduler limits. ``source``
    names the function whose docstring gives every figure."""
    return Preset(
        name=name,
        block_size=16,
        num_blocks=num_blocks,
        host_blocks=int(100 * 2**30 // (16 * kv_token)),
        bytes_per_token=kv_token,
        bandwidth=bandwidth,
        step=StepModel(
            a=2e-3,
            b=flop_token / flops,
            c=flop_token / flops,
            d=kv_token / hbm,
            e=attn_flop_pair / flops,
            m0=weight_bytes / hbm,
            roofline=True,
            idle=2e-3,
        ),
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_prefill_chunk=8192,
        max_prefill_seqs=64,
        max_model_len=32768,
        overlap_copies=True,
        vocab_size=vocab_size,
        notes={"source": f"public figures; see {source}.__doc__"},
    )


#: Engine settings of the real-engine runs when ``bench/local_preset.json`` is absent.
DEFAULT_LOCAL = {
    "engine": {
        "page_size": 16,
        "num_pages": 161,  # 160 usable blocks = 2,560 tokens (see bench/run.py for sizing)
        "host_kv_gib": 0.25,
        "max_model_len": 2048,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 256,
        "max_prefill_chunk": 256,
        "max_prefill_seqs": 2,
    },
    "bytes_per_token": 46_080,  # SmolLM2-135M f32: 30 layers x 3 KV heads x 64 x 2 x 4 B
    "bandwidth": 5e9,
    "step": {"a": 0.03, "b": 0.002, "c": 0.003, "d": 1e-6, "e": 0.0, "idle": 1e-3},
    "vocab_size": 49152,
}


def load_local(path: Path = LOCAL_PRESET_PATH) -> dict[str, Any]:
    """The calibrated local settings (or :data:`DEFAULT_LOCAL` before calibration)."""
    if path.exists():
        return json.loads(path.read_text())
    return json.loads(json.dumps(DEFAULT_LOCAL))


def local_engine_kwargs(path: Path = LOCAL_PRESET_PATH) -> dict[str, Any]:
    """EngineConfig keyword arguments of the real-engine runs (shared with the preset).

    Settings a preset file predates are filled in as they were when it was calibrated: page
    buckets (before ``bucket_pages`` was recorded) and separate prefill and decode calls
    (before ``fused_steps`` was), so the real engine and the simulator build the same calls.
    """
    return _with_layout_defaults(load_local(path)["engine"])


def make_real_engine(policy: str, model: Any = None, engine_kwargs: dict | None = None) -> Any:
    """An in-process engine for ``policy`` with the local preset's configuration; ``model`` is
    ``(model_config, params, tokenizer)`` to reuse loaded weights (default: the default model)."""
    from tokencake.config import EngineConfig
    from tokencake.engine import LLMEngine

    cfg = EngineConfig(**{**(engine_kwargs or local_engine_kwargs()), "policy": policy})
    if model is None:
        return LLMEngine(cfg)
    mc, params, tok = model
    return LLMEngine(cfg, model_config=mc, params=params, tokenizer=tok)


def _with_layout_defaults(engine: dict[str, Any]) -> dict[str, Any]:
    """A copy of a preset's engine settings with the call layout of its time filled in."""
    return {"bucket_pages": True, "fused_steps": False, **engine}


def local(path: Path = LOCAL_PRESET_PATH) -> Preset:
    """This engine on this machine, from ``bench/local_preset.json`` (``bench.calibrate``).

    Assumptions: a step costs the measured price of each padded call shape the runner makes
    for it plus a fitted per-step and per-row overhead (older preset files without a shape
    table fall back to the linear model); copies take ``bytes / bandwidth`` and overlap the
    step only partly, so they are added to it; the KV pool, block size and batch limits are
    the real engine's.
    """
    cfg = load_local(path)
    eng = _with_layout_defaults(cfg["engine"])
    buckets = StepBuckets(eng["page_size"], eng["max_model_len"], eng["max_num_seqs"],
                          eng["max_prefill_chunk"], eng["max_prefill_seqs"],
                          eng["fused_steps"], bucket_pages=eng["bucket_pages"])  # fmt: skip
    bpt = int(cfg["bytes_per_token"])
    host_blocks = int(eng.get("host_kv_gib", 0) * 2**30 // (bpt * eng["page_size"]))
    return Preset(
        name="local",
        block_size=eng["page_size"],
        num_blocks=eng["num_pages"] - 1,
        host_blocks=host_blocks,
        bytes_per_token=bpt,
        bandwidth=float(cfg["bandwidth"]),
        step=StepModel(roofline=False, buckets=buckets, **cfg["step"]),
        max_num_seqs=eng["max_num_seqs"],
        max_num_batched_tokens=eng["max_num_batched_tokens"],
        max_prefill_chunk=eng["max_prefill_chunk"],
        max_prefill_seqs=eng["max_prefill_seqs"],
        max_model_len=eng["max_model_len"],
        overlap_copies=False,
        vocab_size=int(cfg.get("vocab_size", 49152)),
        notes={k: v for k, v in cfg.items() if k not in ("engine", "step")},
    )


PRESETS = {
    "local": local,
    "a800-qwen2.5-14b": a800_qwen25_14b,
    "h100-llama3.1-8b": h100_llama31_8b,
    "h100-llama3.1-8b-pressure": functools.partial(h100_llama31_8b, same_tokens=True),
}


def make_preset(name: str) -> Preset:
    """Build a preset by name; unknown names list the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def describe(p: Preset) -> dict[str, Any]:
    """A JSON-ready description of a preset (written next to every report)."""
    d = asdict(p)
    d["bytes_per_block"] = p.bytes_per_block
    return d
