"""The host KV arrays: the paper's "CPU block buffer", allocated once at start-up.

Layout mirrors the device cache (``kv_cache.py``): ``k`` and ``v`` of shape ``[num_layers,
num_host_blocks, page_size, num_kv_heads, head_dim]``; host block 0 is a dummy block that
padded transfer slots use. Allocating once matters: fresh host buffers pay first-touch page
faults (about 2 GiB/s on the CPU probe) where reused ones copy at memcpy speed.

Where the platform has a ``pinned_host`` memory kind (GPU, TPU, and the CPU backend of jax
0.10) the arrays are ``jax.Array`` in that memory, so copies are DMA-able ``device_put`` /
jitted gather-scatter. Otherwise they are plain numpy arrays and ``transfer.py`` moves pages
with numpy indexing. The choice is made in :func:`host_memory_kind` and nowhere else.

Under tensor parallelism the device cache is sharded on its KV-head axis, and the host tier
is sharded the same way: each device's heads have their own host copy (the pinned arrays carry
the device cache's sharding with the host memory kind; the numpy tier keeps one
:class:`HostShard` per device). A page copy therefore moves every shard between its own device
and its own host memory, in parallel and with no collective; in a multi-process run each
process holds the host copies of the shards its devices hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

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


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """A sharding that replicates a small array (page ids) over ``sharding``'s devices."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(), memory_kind=sharding.memory_kind)
    return sharding


@dataclass
class HostShard:
    """The numpy tier's host copy of one device's KV shard: ``index`` places it in the global
    ``[L, blocks, page, Hkv, D]`` layout (it covers some KV heads of every block)."""

    device: jax.Device
    index: tuple[slice, ...]
    k: np.ndarray
    v: np.ndarray


@dataclass
class HostKV:
    """Host K/V. ``memory_kind`` set: ``k`` / ``v`` are ``jax.Array`` in that memory with the
    device cache's sharding, replaced by each (donating) scatter. ``memory_kind`` None: numpy,
    one :class:`HostShard` per addressable device shard, mutated in place (``k`` / ``v`` None).
    """

    spec: KVCacheSpec  # ``num_pages`` is the number of host blocks (dummy included)
    memory_kind: str | None
    device_sharding: jax.sharding.Sharding  # the device cache's sharding (layout of the shards)
    k: jax.Array | None = None
    v: jax.Array | None = None
    shards: list[HostShard] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return self.spec.num_pages

    @property
    def num_shards(self) -> int:
        """Devices the KV is split over; each moves ``1 / num_shards`` of a page's bytes."""
        return len(self.device_sharding.device_set)

    @property
    def device(self) -> jax.Device:
        """The first device of the layout (the only one without tensor parallelism)."""
        return min(self.device_sharding.addressable_devices, key=lambda d: d.id)

    @property
    def sharding(self) -> jax.sharding.Sharding | None:
        """The host arrays' sharding (None for the numpy tier)."""
        if self.memory_kind is None:
            return None
        return self.device_sharding.with_memory_kind(self.memory_kind)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy of host block ``b`` as numpy ``(k, v)``, each ``[L, page, Hkv, D]``, assembled
        from this process's shards (all of them in one process). For tests: it reads whole
        shards."""
        if self.memory_kind is None:
            parts = [(s.index, s.k, s.v) for s in self.shards]
        else:
            parts = [
                (ks.index, np.asarray(ks.data), np.asarray(vs.data))
                for ks, vs in zip(self.k.addressable_shards, self.v.addressable_shards, strict=True)
            ]
        shape = (self.spec.num_layers, *self.spec.shape[2:])
        dtype = parts[0][1].dtype
        k, v = np.zeros(shape, dtype), np.zeros(shape, dtype)
        for index, sk, sv in parts:
            heads = (index[0], *index[2:])  # the shard's place without the block axis
            k[heads], v[heads] = sk[:, b], sv[:, b]
        return k, v


def allocate_host_kv(
    device_spec: KVCacheSpec,
    num_host_blocks: int,
    device: jax.Device | None = None,
    memory_kind: str | None | bool = True,
    sharding: jax.sharding.Sharding | None = None,
) -> HostKV:
    """Allocate zeroed host K/V for ``num_host_blocks`` blocks shaped like ``device_spec``'s
    pages. ``sharding`` is the device cache's sharding (default: one ``device``, itself
    defaulting to the first); the host tier is sharded like it. ``memory_kind=True`` asks
    :func:`host_memory_kind`; None forces numpy."""
    if sharding is None:
        sharding = SingleDeviceSharding(device or jax.devices()[0])
    spec = KVCacheSpec(
        device_spec.num_layers, num_host_blocks, device_spec.page_size,
        device_spec.num_kv_heads, device_spec.head_dim, device_spec.dtype,
    )  # fmt: skip
    first = min(sharding.addressable_devices, key=lambda d: d.id)
    kind = host_memory_kind(first) if memory_kind is True else memory_kind or None
    dtype = jnp.dtype(spec.dtype)
    sharding = sharding.with_memory_kind("device")
    if kind is None:
        shards = []
        for dev, index in sharding.addressable_devices_indices_map(spec.shape).items():
            shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, spec.shape, strict=True))
            shards.append(HostShard(dev, index, np.zeros(shape, dtype), np.zeros(shape, dtype)))
        return HostKV(spec, None, sharding, shards=shards)
    # Materialise directly in host memory: no device-sized temporary on an accelerator. With a
    # mesh every device's shard is allocated in its own host memory.
    host = sharding.with_memory_kind(kind)
    alloc = jax.jit(lambda: jnp.zeros(spec.shape, dtype), out_shardings=host)
    return HostKV(spec, kind, sharding, alloc(), alloc())
