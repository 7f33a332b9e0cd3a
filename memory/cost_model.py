"""Transfer and recompute cost model (paper §5.7): the one cost-model type the scheduler, the
policies and the simulated executor use. Pure Python; the engine fits the recompute terms from
prefill shapes it times on its runner (``tokencake.diagnostics.profile_step_costs``).

``copy_time(n, dir) = base_dir + n * (bytes_per_block / shards) / bw_dir + n * 3 µs`` with
``bw_dir`` starting at a prior (12 GB/s) and learned as an EWMA (α = 0.5) of completed copies'
measured ``bytes / seconds``, one estimate per direction. Bandwidth is *per shard*: under tensor
parallelism a block's KV is split over ``shards`` devices on the KV-head axis and each device
moves its part over its own host link at the same time (``memory/transfer.py``), so a copy takes
as long as one shard's part and the learned bandwidth is one link's.

``recompute_time(tokens, context) = a + b * tokens + c * tokens * context``: prefill cost is
linear in new tokens plus an attention term over the context they attend to; fitted by least
squares on a few prefill shapes timed at warm-up.

``step_floor_s`` (+ ``step_floor_ctx_s`` per context token a decode row reads) is what a step
costs however little it computes: on an accelerator, reading the weights (and the rows' KV)
once. Where that floor exceeds a step's compute, the step has room for prefill tokens that
cost nothing (:meth:`CostModel.free_prefill_tokens`, the roofline view of Sarathi-Serve's
stall-free batching). 0 (unmeasured) means no such room.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DIRECTIONS = ("d2h", "h2d")
DEFAULT_BANDWIDTH = 12e9  # bytes/s, the paper's prior for both directions
PER_BLOCK_OVERHEAD_S = 3e-6  # submission cost per block (paper §6.6)


@dataclass
class BandwidthEstimator:
    """Per-direction bandwidth: a prior, replaced by an EWMA of observed samples."""

    prior: float = DEFAULT_BANDWIDTH
    alpha: float = 0.5
    value: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prior <= 0 or not 0 < self.alpha <= 1:
            raise ValueError("BandwidthEstimator needs prior > 0 and 0 < alpha <= 1")
        for d in DIRECTIONS:
            self.value.setdefault(d, self.prior)
            self.samples.setdefault(d, 0)

    def observe(self, direction: str, nbytes: int, seconds: float) -> None:
        """Fold one completed copy into the estimate (ignores degenerate samples)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}")
        if nbytes <= 0 or seconds <= 0:
            return
        sample = nbytes / seconds
        if self.samples[direction] == 0:
            self.value[direction] = sample  # the first real sample beats any prior
        else:
            self.value[direction] = self.alpha * sample + (1 - self.alpha) * self.value[direction]
        self.samples[direction] += 1

    def __getitem__(self, direction: str) -> float:
        return self.value[direction]


@dataclass
class CostModel:
    """Seconds to copy blocks between tiers and to recompute tokens."""

    bytes_per_block: int
    bandwidth: BandwidthEstimator = field(default_factory=BandwidthEstimator)
    base_s: dict[str, float] = field(default_factory=lambda: {d: 0.0 for d in DIRECTIONS})
    per_block_s: float = PER_BLOCK_OVERHEAD_S
    # recompute_time = a + b*tokens + c*tokens*context (seconds)
    recompute_a: float = 1e-3
    recompute_b: float = 1e-4
    recompute_c: float = 0.0
    shards: int = 1  # devices a block's KV is split over; each copies its share concurrently
    # A step's cost floor (see the module docstring): seconds, and seconds per context token
    # of its decode rows. 0: unmeasured, no free prefill.
    step_floor_s: float = 0.0
    step_floor_ctx_s: float = 0.0

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"CostModel.shards must be >= 1, got {self.shards}")

    @classmethod
    def fixed(
        cls,
        bytes_per_block: int,
        bandwidth: float = DEFAULT_BANDWIDTH,
        base_s: float = 0.0,
        recompute: tuple[float, float, float] = (1e-3, 1e-4, 0.0),
    ) -> CostModel:
        """A model from fixed numbers (the simulator); ``recompute`` is ``(a, b, c)``."""
        return cls(
            bytes_per_block, BandwidthEstimator(prior=bandwidth), {d: base_s for d in DIRECTIONS},
            PER_BLOCK_OVERHEAD_S, *recompute,
        )  # fmt: skip

    @classmethod
    def paper_default(cls) -> CostModel:
        """The paper's constants (§5.7) when nothing was measured: Qwen2.5-14B's 16-token
        block (3 MiB), 12 GB/s each way, 3 µs per block, recompute 0.1 ms per token."""
        return cls.fixed(3 * 2**20, DEFAULT_BANDWIDTH, 0.0, (0.0, 1e-4, 0.0))

    def copy_time(self, n_blocks: int, direction: str) -> float:
        """Predicted seconds to copy ``n_blocks`` blocks in ``direction`` ("d2h" / "h2d")."""
        if n_blocks <= 0:
            return 0.0
        return (
            self.base_s[direction]
            + n_blocks * self.bytes_per_block / self.shards / self.bandwidth[direction]
            + n_blocks * self.per_block_s
        )

    def recompute_time(self, n_tokens: int, context: int = 0) -> float:
        """Predicted seconds to prefill ``n_tokens`` new tokens after ``context`` cached ones."""
        if n_tokens <= 0:
            return 0.0
        t = self.recompute_a + self.recompute_b * n_tokens + self.recompute_c * n_tokens * context
        return max(t, 0.0)

    def free_prefill_tokens(self, decode_rows: int, decode_context: int) -> int:
        """Prefill tokens a step with ``decode_rows`` decode rows (reading ``decode_context``
        tokens of KV in all) can carry without costing more than those rows alone: the room
        between the step's floor and its compute, ``(floor - a) / b - rows`` (each row or
        prefill token costs ``b`` of compute). 0 when the floor is unmeasured or compute-bound
        hardware has no room."""
        if self.recompute_b <= 0 or self.step_floor_s <= 0:
            return 0
        floor = self.step_floor_s + self.step_floor_ctx_s * decode_context
        return max(0, int((floor - self.recompute_a) / self.recompute_b) - decode_rows)

    def prefill_in_room(self, room: int, context: int, n_max: int) -> tuple[int, int]:
        """How many tokens (at most ``n_max``) of a prefill chunk that starts after
        ``context`` cached tokens fit in ``room`` (counted, as :meth:`free_prefill_tokens`
        counts it, in tokens of ``b`` compute each), and how much of the room they use.

        Each token also attends to the context before it, ``c * (context + n / 2)`` on
        average, so a chunk of ``n`` uses ``n * (1 + (c / b) * (context + n / 2))``: beside
        a long context a chunk gets fewer tokens than the bare room would give it."""
        n_max = min(n_max, room)
        if n_max <= 0 or self.recompute_c <= 0 or self.recompute_b <= 0:
            return max(n_max, 0), max(n_max, 0)
        k = self.recompute_c / self.recompute_b
        lin = 1.0 + k * context  # the largest n with (k / 2) n^2 + lin * n <= room
        n = min(n_max, int((math.sqrt(lin * lin + 2.0 * k * room) - lin) / k))

        def used(m: int) -> int:
            return math.ceil(m * (lin + k * m / 2))

        while n > 0 and used(n) > room:  # float rounding at the boundary
            n -= 1
        return n, used(n)

    def fit_recompute(self, samples: Sequence[tuple[int, int, float]]) -> None:
        """Least-squares fit of ``(a, b, c)`` from ``(tokens, context, seconds)`` samples;
        negative coefficients are clipped (a noisy fit must not predict free work)."""
        import numpy as np

        x = np.array([[1.0, n, n * ctx] for n, ctx, _ in samples])
        y = np.array([s for _, _, s in samples])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        self.recompute_a, self.recompute_b, self.recompute_c = (max(float(c), 0.0) for c in coef)
