"""Tokencake with one mechanism switched off (or, for those off by default, on), by name:
``tokencake-no-<mechanism>`` / ``tokencake-with-<mechanism>``. The ablation table of
``bench/RESULTS.md`` runs each of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tokencake.scheduler.policy import Policy, PolicyContext
from tokencake.scheduler.tokencake_config import TokencakeConfig

#: name suffix -> (SpaceConfig changes, TimeConfig changes)
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no-reservations": ({"reserve_ratio_min": 0.0, "reserve_ratio_max": 0.0}, {}),
    "no-scoring": ({"admission_order": "arrival"}, {}),
    "no-keep": ({}, {"keep": False}),
    "no-write-back": ({}, {"write_back_all": False}),
    "no-inflight-sharing": ({"defer_inflight_prefix": False}, {}),
    "no-backfill": ({"backfill": False}, {}),
    "no-growth-release": ({}, {"growth_release": False}),
    "no-stall-free-prefill": ({"stall_free_prefill": False}, {}),
    "with-full-future-admission": ({"reserve_generation_tokens": True}, {}),
    "with-resident-affinity": ({"affinity_counts_cached": True}, {}),
    "with-successor-handoff": ({"successor_handoff_s": 0.5}, {}),
    "with-restore-time-victims": ({"victim_by_restore_time": True}, {}),
    "with-second-pass-backfill": ({"backfill_second_pass": True}, {}),
    # reuse-ranked eviction is off by default (twentieth round)
    "with-reuse-eviction": ({}, {"reuse_aware_eviction": True}),
    # selective offload is off by default (issue 12); predictive upload acts only with it
    "with-offload": ({}, {"selective_offload": True}),
    "with-offload-no-predictive-upload": (
        {},
        {"selective_offload": True, "predictive_upload": False},
    ),
}


def ablation_config(suffix: str, base: TokencakeConfig | None = None) -> TokencakeConfig:
    """``base`` (default: the defaults) with the ``suffix`` mechanism changed."""
    space, time = ABLATIONS[suffix]
    c = base or TokencakeConfig()
    return dataclasses.replace(
        c,
        scheduling=dataclasses.replace(c.scheduling, **space),
        offload=dataclasses.replace(c.offload, **time),
    )


def ablation_policy(suffix: str) -> Callable[[PolicyContext], Policy]:
    """Factory of ``tokencake-<suffix>``: Tokencake on the context's config, one change."""
    from tokencake.scheduler.tokencake_policy import TokencakePolicy

    def make(ctx: PolicyContext) -> Policy:
        return TokencakePolicy(
            dataclasses.replace(ctx, tokencake=ablation_config(suffix, ctx.tokencake))
        )

    return make
