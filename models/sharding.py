"""Tensor parallelism: a 1-D device mesh over the ``tp`` axis, weights and KV sharded by head.

Attention heads, KV heads and the MLP's hidden units are split across devices; column-parallel
matrices (q/k/v, gate/up) shard their output axis, row-parallel ones (o, down) their input axis,
so XLA inserts one all-reduce after each. Embeddings, norms and the LM head are replicated. The
attention kernel runs under ``shard_map`` on each device's local heads, so any backend works
unchanged on one shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tokencake.models.attention.backend import LayerAttentionFn
from tokencake.models.config import ModelConfig

AXIS = "tp"

# Partition spec of each canonical parameter (models/weights.py); missing keys are replicated.
PARAM_SPECS: dict[str, P] = {
    "wq": P(None, None, AXIS),
    "wk": P(None, None, AXIS),
    "wv": P(None, None, AXIS),
    "bq": P(None, AXIS),
    "bk": P(None, AXIS),
    "bv": P(None, AXIS),
    "wo": P(None, AXIS, None),
    "w_gate": P(None, None, AXIS),
    "w_up": P(None, None, AXIS),
    "w_down": P(None, AXIS, None),
}
KV_SPEC = P(None, None, None, AXIS, None)  # [L, pages, page, Hkv, D]
HEADS_SPEC = P(None, None, AXIS, None)  # q [S, Q, Hq, D] and one layer's pages [N, page, Hkv, D]


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """Refuse a tensor-parallel size that does not split the heads and MLP evenly."""
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):  # fmt: skip
        if n % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide {name}={n} of model {cfg.name!r}"
            )


def make_mesh(tp: int) -> Mesh:
    """A ``tp``-device mesh over the first ``tp`` devices (all processes' devices when distributed)."""
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f"tensor_parallel_size={tp} but only {len(devices)} device(s) are visible")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


def param_spec(key: str, per_layer: bool = False) -> P:
    """Partition spec of canonical parameter ``key``; ``per_layer`` for one layer's slice of a
    stacked ``[L, ...]`` parameter (the spec without its leading layer axis)."""
    spec = PARAM_SPECS.get(key, P())
    return P(*tuple(spec)[1:]) if per_layer and len(spec) else spec


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, KV_SPEC)


def shard_attention(fn: LayerAttentionFn, mesh: Mesh) -> LayerAttentionFn:
    """Run the model-facing ``fn`` per device over its local query and KV heads."""

    def wrapped(q, k_cache, v_cache, block_tables, q_lens, kv_lens, *, scale, layer):
        def local(q, k_cache, v_cache, block_tables, q_lens, kv_lens, layer):
            return fn(q, k_cache, v_cache, block_tables, q_lens, kv_lens, scale=scale, layer=layer)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(HEADS_SPEC, KV_SPEC, KV_SPEC, P(), P(), P(), P()),
            out_specs=HEADS_SPEC,
            check_vma=False,
        )(q, k_cache, v_cache, block_tables, q_lens, kv_lens, jnp.asarray(layer, jnp.int32))

    return wrapped
