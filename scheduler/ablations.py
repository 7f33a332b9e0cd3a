"""Tokencake with one mechanism switched off (or, for full-future admission, on), by name:
``tokencake-no-<mechanism>``. The ablation table of ``bench/RESULTS.md`` runs each of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokencake.scheduler.tokencake_config import TokencakeConfig

#: name suffix -> (SpaceConfig changes, TimeConfig changes)
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no-reservations": ({"reserve_ratio_min": 0.0, "reserve_ratio_max": 0.0}, {}),
    "no-scoring": ({"admission_order": "arrival"}, {}),
    "no-keep": ({}, {"keep": False}),
    "no-offload": ({}, {"selective_offload": False}),
    "no-predictive-upload": ({}, {"predictive_upload": False}),
    "no-reuse-eviction": ({}, {"reuse_aware_eviction": False}),
    "no-write-back": ({}, {"write_back_all": False}),
    "no-inflight-sharing": ({"defer_inflight_prefix": False}, {}),
    "with-full-future-admission": ({"reserve_generation_tokens": True}, {}),
}


def ablation_config(suffix: str) -> TokencakeConfig:
    """The default :class:`TokencakeConfig` with the ``suffix`` mechanism changed."""
    space, time = ABLATIONS[suffix]
    c = TokencakeConfig()
    return dataclasses.replace(
        c,
        scheduling=dataclasses.replace(c.scheduling, **space),
        offload=dataclasses.replace(c.offload, **time),
    )
