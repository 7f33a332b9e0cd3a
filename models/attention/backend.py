"""The attention-backend interface and the registry that picks one at start-up."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import jax

from tokencake.models.attention.chunked import chunked_paged_attention
from tokencake.models.attention.reference import reference_paged_attention

log = logging.getLogger(__name__)

# Signature shared by every backend (see reference.py for the semantics):
#   fn(q[S,Q,Hq,D], k_pages[N,page,Hkv,D], v_pages[N,page,Hkv,D], block_tables[S,P],
#      q_lens[S], kv_lens[S], *, scale) -> [S,Q,Hq,D]
AttentionFn = Callable[..., jax.Array]
# What the model calls, once per layer: the whole caches and the layer index,
#   fn(q, k_cache[L,N,page,Hkv,D], v_cache, block_tables, q_lens, kv_lens, *, scale, layer)
LayerAttentionFn = Callable[..., jax.Array]


@dataclass(frozen=True)
class AttentionBackend:
    """A named paged-attention implementation over the engine's KV layout.

    ``whole_cache`` backends take the layer-major caches and ``layer=`` themselves (their
    gathers index the layer and the pages at once); the others get one layer's pages."""

    name: str
    fn: AttentionFn
    whole_cache: bool = False

    def layer_fn(self) -> LayerAttentionFn:
        """The backend in the form the model calls (see ``LayerAttentionFn``)."""
        if self.whole_cache:
            return self.fn
        fn = self.fn

        def one_layer(q, k_cache, v_cache, block_tables, q_lens, kv_lens, *, scale, layer):
            return fn(q, k_cache[layer], v_cache[layer], block_tables, q_lens, kv_lens, scale=scale)

        return one_layer


BACKENDS = ("reference", "chunked", "pallas-gpu", "pallas-tpu")


def default_backend_name(platform: str | None = None) -> str:
    """The backend chosen for ``platform`` (``jax.default_backend()`` when None)."""
    platform = platform or jax.default_backend()
    # Elsewhere (CPU) the chunked XLA backend: its cost follows the longest row's context.
    return {"gpu": "pallas-gpu", "cuda": "pallas-gpu", "tpu": "pallas-tpu"}.get(platform, "chunked")


# Backends whose work stops at each call's longest live row: padding a call to a wider page
# bucket costs them nothing (bench/RESULTS.md §7), so the runner compiles one page bucket.
FOLLOWS_LIVE_CONTEXT = ("chunked",)


def resolve_backend_name(name: str | None = None, platform: str | None = None) -> str:
    """The backend ``name`` stands for ("auto"/None picks from ``platform``, by default
    ``jax.default_backend()``); errors name the choices."""
    if name in (None, "auto"):
        name = default_backend_name(platform)
    if name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
        )
    return name


def get_backend(name: str | None = None) -> AttentionBackend:
    """Resolve a backend by name ("auto"/None picks from the platform); errors name the choices."""
    name = resolve_backend_name(name)
    if name == "reference":
        return AttentionBackend("reference", reference_paged_attention)
    if name == "chunked":
        # Whole caches: a layer slice taken outside the chunk loop would be copied (the whole
        # layer's pool, every layer, every step); a gather by (layer, page) reads in place.
        return AttentionBackend("chunked", chunked_paged_attention, whole_cache=True)
    if name == "pallas-gpu":
        from tokencake.models.attention import pallas_gpu

        return pallas_gpu.make_backend()
    from tokencake.models.attention import pallas_tpu

    return pallas_tpu.make_backend()
