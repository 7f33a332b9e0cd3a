"""Partitioning device capacity (paper digest §4.3): the shared pool and the per-critical-type
reservations, re-split every ``SpaceConfig.adjustment_window`` steps (and while there is none).

The reserve ratio moves by one step at the usage watermarks (within its bounds); the most
valuable agent types (by type score, then importance) are critical; the reserved blocks are
split among them by the larger of their score share and the mean of score and memory share,
with largest-remainder rounding so the parts always sum to the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokencake.scheduler.tokencake_config import SpaceConfig


@dataclass
class PartitionPlan:
    """One split: ``shared`` blocks for everyone, ``reserved`` blocks per critical type, and
    the type ``scores`` it was made from (``ratio``: the reserve ratio it used)."""

    ratio: float
    shared: int
    reserved: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def critical(self) -> set[str]:
        return set(self.reserved)


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` by ``weights``: floors first, leftovers to the largest fractions (ties by
    key), so the parts always sum to ``total``."""
    if not weights:
        return {}
    wsum = sum(weights.values())
    exact = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(math.floor(v)) for k, v in exact.items()}
    left = total - sum(out.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def partition(
    cfg: SpaceConfig,
    total_blocks: int,
    usage: float,
    prev_ratio: float | None,
    type_scores: dict[str, float],
    importance: dict[str, float],
    used_blocks: dict[str, int],
) -> PartitionPlan:
    """One repartition: adapt the ratio at the watermarks, pick critical types, split."""
    ratio = cfg.reserve_ratio_min if prev_ratio is None else prev_ratio
    if prev_ratio is not None:
        if usage >= cfg.gpu_usage_high:
            ratio += cfg.reserve_adjustment_step
        elif usage <= cfg.gpu_usage_low:
            ratio -= cfg.reserve_adjustment_step
    ratio = round(min(cfg.reserve_ratio_max, max(cfg.reserve_ratio_min, ratio)), 10)
    if not type_scores:
        return PartitionPlan(ratio, total_blocks)
    order = sorted(
        type_scores, key=lambda k: (type_scores[k], importance.get(k, 0.0), k), reverse=True
    )
    critical = order[: max(1, int(len(order) * cfg.critical_ratio))]
    reserved_total = int(total_blocks * ratio)
    ssum = sum(type_scores[k] for k in critical)
    usum = sum(used_blocks.get(k, 0) for k in critical)
    weights = {}
    for k in critical:
        score_share = type_scores[k] / ssum
        mem_share = used_blocks.get(k, 0) / usum if usum else 0.0
        weights[k] = max(score_share, (mem_share + score_share) / 2, 1e-6)
    return PartitionPlan(ratio, total_blocks - reserved_total, largest_remainder(reserved_total, weights),
                         dict(type_scores))  # fmt: skip
