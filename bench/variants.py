"""Engine variants named on a benchmark's command line: a layer loop with ``+`` suffixes.

``switch+nofuse+bf16`` is the switch loop with ``fuse_projections`` off and bfloat16 weights.
Suffixes: ``+pack`` (``pack_weights``), ``+nofuse`` (``fuse_projections=False``), ``+in_out``
(``transpose_weights=False``), ``+ladder`` (``bucket_pages=True``), ``+bf16``
(``weight_dtype="bfloat16"``). ``bench_peer.py`` and ``bench_layer_loops.py`` read them.
"""

from __future__ import annotations

from typing import Any

SUFFIXES = {
    "pack": {"pack_weights": True},
    "nofuse": {"fuse_projections": False},
    "in_out": {"transpose_weights": False},
    "ladder": {"bucket_pages": True},
    "bf16": {"weight_dtype": "bfloat16"},
}


def runner_options(variant: str) -> dict[str, Any]:
    """``RunnerConfig`` keyword arguments of ``variant`` (ValueError names an unknown suffix)."""
    loop, *suffixes = variant.split("+")
    options: dict[str, Any] = {"layer_loop": loop}
    for s in suffixes:
        if s not in SUFFIXES:
            raise ValueError(f"unknown variant suffix +{s} in {variant!r}; know {sorted(SUFFIXES)}")
        options.update(SUFFIXES[s])
    return options
