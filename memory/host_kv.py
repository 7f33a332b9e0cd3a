"""The host KV arrays: the paper's "CPU block buffer", allocated once at start-up.

Layout mirrors the device cache (``kv_cache.py``): ``k`` and ``v`` of shape ``[num_layers,
num_host_blocks, page_size, num_kv_heads, head_dim]``; host block 0 is a dummy block that
padded transfer slots use. Allocating once matters: fresh host buffers pay first-touch page
faults (about 2 GiB/s on the CPU probe) where reused ones copy at memcpy speed.

Where the platform has a ``pinned_host`` memory kind (GPU, TPU, and the CPU backend of jax
0.10) the arrays are ``jax.Array`` in that memory, so copies are DMA-able ``device_put`` /
jitted gather-scatter. Otherwise they are plain numpy arrays and ``transfer.py`` moves pages
with numpy indexing. The choice is made in :func:`host_memory_kind` and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from tokencake.memory.kv_cache import KVCacheSpec


def host_memory_kind(device: jax.Device) -> str | None:
    """``"pinned_host"`` if ``device`` can address pinned host memory, else None (numpy).

    ``unpinned_host`` is deliberately not used: it does not exist on GPU and silently corrupted
    strided bf16 transfers on TPU (sglang-jax).
    """
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return "pinned_host" if "pinned_host" in kinds else None


@dataclass
class HostKV:
    """Host K/V arrays. ``memory_kind`` None means numpy arrays (mutated in place); otherwise
    ``jax.Array`` in that memory, replaced by each (donating) scatter."""

    k: jax.Array | np.ndarray
    v: jax.Array | np.ndarray
    spec: KVCacheSpec  # ``num_pages`` is the number of host blocks (dummy included)
    memory_kind: str | None
    device: jax.Device

    @property
    def num_blocks(self) -> int:
        return self.spec.num_pages

    @property
    def sharding(self) -> SingleDeviceSharding | None:
        if self.memory_kind is None:
            return None
        return SingleDeviceSharding(self.device, memory_kind=self.memory_kind)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy of host block ``b`` as numpy ``(k, v)``, each ``[L, page, Hkv, D]`` (tests)."""
        return np.array(self.k[:, b]), np.array(self.v[:, b])


def allocate_host_kv(
    device_spec: KVCacheSpec,
    num_host_blocks: int,
    device: jax.Device | None = None,
    memory_kind: str | None | bool = True,
) -> HostKV:
    """Allocate zeroed host K/V for ``num_host_blocks`` blocks shaped like ``device_spec``'s
    pages. ``memory_kind=True`` asks :func:`host_memory_kind`; None forces numpy."""
    device = device or jax.devices()[0]
    spec = KVCacheSpec(
        device_spec.num_layers, num_host_blocks, device_spec.page_size,
        device_spec.num_kv_heads, device_spec.head_dim, device_spec.dtype,
    )  # fmt: skip
    kind = host_memory_kind(device) if memory_kind is True else memory_kind or None
    dtype = jnp.dtype(spec.dtype)
    if kind is None:
        return HostKV(np.zeros(spec.shape, dtype), np.zeros(spec.shape, dtype), spec, None, device)
    sharding = SingleDeviceSharding(device, memory_kind=kind)
    # Materialise directly in host memory: no device-sized temporary on an accelerator.
    alloc = jax.jit(lambda: jnp.zeros(spec.shape, dtype), out_shardings=sharding)
    return HostKV(alloc(), alloc(), spec, kind, device)
