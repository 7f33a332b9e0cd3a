"""The model runner's static configuration (step shapes, dtype, attention backend, layer loop,
tensor parallelism) and the persistent compilation cache its warm-up reads and fills.

``EngineConfig.runner_config`` builds a :class:`RunnerConfig` from the fields the two share.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jax

from tokencake.buckets import StepBuckets
from tokencake.config import check_weight_dtype
from tokencake.models.attention.backend import FOLLOWS_LIVE_CONTEXT, resolve_backend_name
from tokencake.models.llama import LAYER_LOOPS


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
    # the matrices, embedding and LM head; None = dtype (models/llama.py DecoderLM)
    weight_dtype: str | None = None
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    layer_loop: str = "auto"  # "auto" (switch on CPU, scan elsewhere) or one of LAYER_LOOPS
    pack_weights: bool = False  # on one CPU device: weights in one huge-page buffer (host_arena)
    # one device: q/k/v and gate/up concatenated, 4 dots a layer instead of 7 (models/llama.py)
    fuse_projections: bool = True
    # one device: matrices stored [out, in]; None = on CPU, where few-row dots read them faster
    transpose_weights: bool | None = None
    # a step's prefill chunk and decode rows in one call (buckets.py); None = on CPU
    fused_steps: bool | None = None
    # calls padded to a ladder of page buckets; None = unless the attention follows the live
    # context (models/attention/backend.py FOLLOWS_LIVE_CONTEXT)
    bucket_pages: bool | None = None

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.num_pages < 2:
            raise ValueError("RunnerConfig needs page_size >= 1 and num_pages >= 2")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        check_weight_dtype(self.weight_dtype, self.dtype)
        if self.layer_loop != "auto" and self.layer_loop not in LAYER_LOOPS:
            raise ValueError(
                f"layer_loop must be 'auto' or one of {LAYER_LOOPS}, got {self.layer_loop!r}"
            )

    def resolved_layer_loop(self, platform: str | None = None) -> str:
        """The layer loop used on ``platform`` (``jax.default_backend()`` when None): on CPU
        the switch loop, whose dots read the weights in place; elsewhere the scan (an XLA:GPU
        conditional syncs with the host to pick its branch)."""
        if self.layer_loop != "auto":
            return self.layer_loop
        return "switch" if (platform or jax.default_backend()) == "cpu" else "scan"

    def resolved_transpose_weights(self, platform: str | None = None) -> bool:
        """Whether the matrices are stored ``[out, in]`` on ``platform`` (``jax.default_backend()``
        when None): by default on CPU, where XLA's dots of 4-32 rows (batched decode) read that
        layout in about 0.8x the time of ``[in, out]`` and large-M dots (prefill) are unchanged
        (``bench/RESULTS.md`` §7); elsewhere the checkpoint's ``[in, out]``, not measured."""
        if self.transpose_weights is not None:
            return self.transpose_weights
        return (platform or jax.default_backend()) == "cpu"

    def resolved_bucket_pages(self, platform: str | None = None) -> bool:
        """Whether calls are padded to a ladder of page buckets on ``platform``
        (``jax.default_backend()`` when None). By default not with an attention whose work
        follows the live context (``FOLLOWS_LIVE_CONTEXT``: ``chunked``, the CPU default): a
        call costs the same in any page bucket (``bench/RESULTS.md`` §7), and one bucket, the
        largest, compiles a third of the programs. The other backends work over the padded
        width."""
        if self.bucket_pages is not None:
            return self.bucket_pages
        return resolve_backend_name(self.attention_backend, platform) not in FOLLOWS_LIVE_CONTEXT

    def resolved_fused_steps(self, platform: str | None = None) -> bool:
        """Whether a step's prefill chunk and decode rows run as one call on ``platform``
        (``jax.default_backend()`` when None). By default on CPU with one device: there a mixed
        step took 0.77-0.85x the time of two calls and the fused family adds 12 programs to
        warm-up (one page bucket, ``bench/RESULTS.md`` §5); elsewhere off, not measured (with
        the page-bucket ladder of the other backends the family is 96 programs)."""
        if self.fused_steps is not None:
            return self.fused_steps
        return (platform or jax.default_backend()) == "cpu" and self.tensor_parallel_size == 1

    @cached_property
    def buckets(self) -> StepBuckets:
        """The step shape buckets of this configuration (shared with the simulator)."""
        return StepBuckets(self.page_size, self.max_model_len, self.max_num_seqs,
                           self.max_prefill_chunk, self.max_prefill_seqs,
                           self.resolved_fused_steps(),
                           bucket_pages=self.resolved_bucket_pages())  # fmt: skip

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
