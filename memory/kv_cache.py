"""The device KV cache: its layout, defined here and nowhere else.

Layout: two arrays ``k`` and ``v`` of shape ``[num_layers, num_pages, page_size, num_kv_heads,
head_dim]``. A *page* (a.k.a. block) holds ``page_size`` consecutive token positions of one
sequence for every layer, so one block id addresses the same slice of both arrays in all layers;
the block pool hands out block ids and transfers move whole pages across all layers at once.

Page 0 is a dummy page: padding tokens write their K/V there and padding block-table entries point
at it. It is never handed out by the block pool, so garbage written to it can only ever be read
under a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from tokencake.memory.block_pool import DUMMY_PAGE  # noqa: F401  (re-export; one definition)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and dtype of the paged KV cache."""

    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "page_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be positive, got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError("KVCacheSpec.num_pages must be >= 2 (page 0 is the dummy page)")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page across all layers, K and V together."""
        itemsize = np.dtype(jnp.dtype(self.dtype)).itemsize
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize

    @staticmethod
    def pages_for_bytes(
        budget_bytes: int,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str = "float32",
    ) -> int:
        """How many pages (including the dummy page) fit in ``budget_bytes``."""
        probe = KVCacheSpec(num_layers, 2, page_size, num_kv_heads, head_dim, dtype)
        return max(2, budget_bytes // probe.bytes_per_page)


def allocate_kv_cache(
    spec: KVCacheSpec, sharding: jax.sharding.Sharding | None = None
) -> tuple[jax.Array, jax.Array]:
    """Allocate zeroed ``(k, v)`` device arrays for ``spec`` (optionally sharded by KV head)."""
    dtype = jnp.dtype(spec.dtype)

    def make() -> jax.Array:
        return jnp.zeros(spec.shape, dtype)

    if sharding is None:
        return make(), make()
    alloc = jax.jit(make, out_shardings=sharding)
    return alloc(), alloc()
