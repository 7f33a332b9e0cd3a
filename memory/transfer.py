"""Batched, non-blocking KV page copies between the device cache and the host tier.

One copy moves a list of whole pages (all layers, K and V) in one direction:

* **d2h** (copy-out): one jitted call gathers ``k[:, ids]`` on the device, ``device_put``\\s the
  pages into host memory and scatters them into the host arrays, which are donated, so the
  update is in place (verified on CPU jax 0.10.2: same buffer pointer, no copy of the pool);
* **h2d** (copy-in): one jitted call gathers the host pages (the host ids must themselves live
  in host memory: XLA refuses a gather whose operands sit in different memory spaces),
  ``device_put``\\s them to the device and scatters them into the runner's ``k`` / ``v``, which
  are donated and rebound on the runner.

Fusing gather, transfer and scatter in one executable matters on CPU: the staged variant
(gather, then ``device_put``, then a separate host scatter) made three copies and reached a
third of a raw ``device_put``'s throughput; the fused one beats it (see bench_transfer.py).
Where the host arrays are numpy (no pinned memory kind) the host side uses numpy indexing.

Under tensor parallelism the device cache and the host tier are both sharded on the KV-head
axis (``host_kv.py``) and the page ids are replicated, so every gather, ``device_put`` and
scatter stays within one device's shard: XLA partitions the copy into one independent copy per
device, with no collective (a test checks the compiled text) and nothing staged through one
device. The numpy tier does the same by hand, shard by shard, and reassembles the uploaded
pages with ``jax.make_array_from_single_device_arrays`` on the cache's own sharding. Bandwidth
is learned per shard (bytes each device moved over the copy's time), which is what the cost
model divides a block's per-shard bytes by.

Id lists are padded to power-of-two buckets with the dummy page / dummy host block, so only
``len(buckets)`` shapes per direction ever compile (all at :meth:`TransferEngine.warmup`).

Copies are asynchronous: :meth:`TransferEngine.issue` dispatches and returns a handle at once;
:meth:`TransferEngine.poll` reports handles whose results are ready (``jax.Array.is_ready``).

The transfer engine only moves bytes: which pages are under a copy (the fences) is tracked
once, by the scheduler's ``CopyTracker``, which also checks every step against them.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tokencake.executable_cache import compile_lowered
from tokencake.memory.cost_model import BandwidthEstimator
from tokencake.memory.host_kv import HostKV, replicated
from tokencake.memory.host_pool import DUMMY_HOST_BLOCK
from tokencake.memory.kv_cache import DUMMY_PAGE

log = logging.getLogger(__name__)


class KVOwner(Protocol):
    """What the transfer engine needs of the executor: the device KV arrays, rebindable."""

    k: jax.Array
    v: jax.Array


class _Marker(Protocol):
    def is_ready(self) -> bool: ...


@dataclass(eq=False)
class TransferHandle:
    """One issued copy. ``done`` once every bucketed piece finished; ``error`` if it failed."""

    id: int
    direction: str
    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]
    nbytes: int
    tag: str = ""
    issued_at: float = 0.0
    completed_at: float | None = None
    error: BaseException | None = None
    markers: list[Any] = field(default_factory=list)
    _ready_at: float | None = None  # set by the waiter thread: precise completion time

    @property
    def done(self) -> bool:
        return self.completed_at is not None

    @property
    def ok(self) -> bool:
        return self.done and self.error is None


def transfer_buckets(max_bucket: int) -> tuple[int, ...]:
    """Power-of-two bucket sizes ``1, 2, 4, ..`` up to and including ``max_bucket``."""
    out, b = [], 1
    while b < max_bucket:
        out.append(b)
        b *= 2
    out.append(max_bucket)
    return tuple(out)


class TransferEngine:
    """Issues and tracks D2H / H2D page copies between ``owner.k/v`` and ``host_kv``."""

    def __init__(
        self,
        owner: KVOwner,
        host_kv: HostKV,
        bandwidth: BandwidthEstimator | None = None,
        max_bucket: int = 256,
    ) -> None:
        if not owner.k.sharding.is_equivalent_to(host_kv.device_sharding, owner.k.ndim):
            raise ValueError(
                f"the host KV tier is laid out for {host_kv.device_sharding}, but the device "
                f"cache is sharded as {owner.k.sharding}"
            )
        self.owner = owner
        self.host = host_kv
        self.bandwidth = bandwidth or BandwidthEstimator()
        self.bytes_per_block = host_kv.spec.bytes_per_page
        self.num_shards = host_kv.num_shards
        cap = max(1, min(max_bucket, host_kv.num_blocks - 1, owner.k.shape[1] - 1))
        self.buckets = transfer_buckets(cap)
        self.in_flight: dict[int, TransferHandle] = {}
        self.completed = 0
        self.failed = 0
        self.strict = False  # after warm-up an uncompiled bucket is a bug
        self._ids = itertools.count()
        self._compiled: dict[tuple[str, int], Any] = {}
        self._kv_sharding = host_kv.device_sharding  # the device cache's (sharded) layout
        self._ids_sharding = replicated(self._kv_sharding)  # page ids: on every device
        self._host_sharding = host_kv.sharding
        self._host_of = {s.device: s for s in host_kv.shards}  # numpy tier: device -> shard
        self.channel = None  # multi-process leader: announces each copy (tokencake.multihost)
        self.group = None  # multi-process, every process: waits for new compiles together
        self._last_done: dict[str, float] = {"d2h": 0.0, "h2d": 0.0}
        # The waiter thread holds only the queue, never ``self``: a dropped engine is collected
        # (its KV pools freed) and the finalizer stops the thread; close() stops it at once.
        self._waiter_q: queue.SimpleQueue[TransferHandle | None] = queue.SimpleQueue()
        self._waiter = threading.Thread(
            target=_record_landings, args=(self._waiter_q,), name="kv-transfer-waiter",
            daemon=True,
        )  # fmt: skip
        self._waiter.start()
        self._stop_waiter = weakref.finalize(self, self._waiter_q.put, None)

    def close(self) -> None:
        """Stop the waiter thread (copies in flight still finish; poll() still reports them)."""
        self._stop_waiter()

    # ---- compiled kernels --------------------------------------------------------------------
    def _fn(self, direction: str, bucket: int):
        key = (direction, bucket)
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        if self.strict:
            raise RuntimeError(f"transfer bucket {key} was not compiled at warm-up (bucketing bug)")
        fn = self._build(direction, bucket)
        self._compiled[key] = fn
        return fn

    def _build(self, direction: str, bucket: int):
        k, v, hk, hv = self.owner.k, self.owner.v, self.host.k, self.host.v
        hs, ds, rs = self._host_sharding, self._kv_sharding, self._ids_sharding
        ids = jax.ShapeDtypeStruct((bucket,), jnp.int32, sharding=rs)
        if hs is None:  # numpy host tier: only the device half is jitted
            if direction == "d2h":
                gather = jax.jit(lambda k, v, ids: (k[:, ids], v[:, ids]), out_shardings=(ds, ds))
                return compile_lowered(gather.lower(k, v, ids), k, "copy")
            shape = (k.shape[0], bucket, *k.shape[2:])
            data = jax.ShapeDtypeStruct(shape, k.dtype, sharding=ds)
            scatter = jax.jit(
                lambda k, v, ids, pk, pv: (
                    k.at[:, ids].set(pk),
                    v.at[:, ids].set(pv),
                    jnp.sum(ids),
                ),
                donate_argnums=(0, 1),
                out_shardings=(ds, ds, rs),
            )
            return compile_lowered(scatter.lower(k, v, ids, data, data), k, "copy")
        if direction == "d2h":

            def d2h(k, v, hk, hv, ids, hids):
                pk = jax.device_put(k[:, ids], hs)
                pv = jax.device_put(v[:, ids], hs)
                return hk.at[:, hids].set(pk), hv.at[:, hids].set(pv), jnp.sum(hids)

            fn = jax.jit(d2h, donate_argnums=(2, 3), out_shardings=(hs, hs, rs))
            return compile_lowered(fn.lower(k, v, hk, hv, ids, ids), k, "copy")

        def h2d(k, v, hk, hv, ids, hids):
            pk = jax.device_put(hk[:, hids], ds)
            pv = jax.device_put(hv[:, hids], ds)
            return k.at[:, ids].set(pk), v.at[:, ids].set(pv), jnp.sum(ids)

        hids = jax.ShapeDtypeStruct((bucket,), jnp.int32, sharding=replicated(hs))
        fn = jax.jit(h2d, donate_argnums=(0, 1), out_shardings=(ds, ds, rs))
        return compile_lowered(fn.lower(k, v, hk, hv, ids, hids), k, "copy")

    def warmup(self) -> None:
        """Compile every bucket in both directions; afterwards a new shape raises."""
        for direction in ("d2h", "h2d"):
            for b in self.buckets:
                self._fn(direction, b)
        self.strict = True

    # ---- issuing ---------------------------------------------------------------------------
    def issue(
        self,
        direction: str,
        device_blocks: Sequence[int],
        host_blocks: Sequence[int],
        tag: str = "",
    ) -> TransferHandle:
        """Start copying ``device_blocks[i] <-> host_blocks[i]``; returns at once.

        A dispatch error does not raise: the handle comes back failed and :meth:`poll`
        reports it, so the caller has one completion path for success and failure.
        """
        if direction not in ("d2h", "h2d"):
            raise ValueError(f"unknown direction {direction!r}")
        dev, host = tuple(device_blocks), tuple(host_blocks)
        if len(dev) != len(host):
            raise ValueError("device_blocks and host_blocks differ in length")
        if len(set(dev)) != len(dev) or len(set(host)) != len(host):
            raise ValueError("a copy lists the same block twice")
        if DUMMY_PAGE in dev or DUMMY_HOST_BLOCK in host:
            raise ValueError("the dummy page / host block cannot be copied")
        h = TransferHandle(
            next(self._ids), direction, dev, host, len(dev) * self.bytes_per_block, tag
        )
        h.issued_at = time.perf_counter()
        self.in_flight[h.id] = h
        try:
            step = self.buckets[-1]
            for i in range(0, len(dev), step):
                h.markers.append(self._dispatch(direction, dev[i : i + step], host[i : i + step]))
        except Exception as e:  # reported through poll(), never half-applied silently
            log.warning("KV transfer %s %s failed at dispatch: %s", direction, tag, e)
            h.error = e
        if h.error is None and any(isinstance(m, jax.Array) for m in h.markers):
            self._waiter_q.put(h)
        return h

    def _pad(self, ids: Sequence[int], fill: int) -> tuple[int, np.ndarray]:
        bucket = next(b for b in self.buckets if b >= len(ids))
        out = np.full((bucket,), fill, np.int32)
        out[: len(ids)] = ids
        return bucket, out

    def _dispatch(self, direction: str, dev: Sequence[int], host: Sequence[int]) -> _Marker:
        """Dispatch one bucketed piece; returns something whose ``is_ready()`` says it landed.
        (Tests override this to defer or fail copies.)"""
        _, ids = self._pad(dev, DUMMY_PAGE)
        _, hids = self._pad(host, DUMMY_HOST_BLOCK)
        if self.channel is not None:  # the other processes copy their shards with these ids
            self.channel.send_copy(direction, ids, hids)
        return self.run_copy(direction, ids, hids)

    def run_copy(self, direction: str, ids: np.ndarray, hids: np.ndarray) -> _Marker:
        """Launch one bucketed copy of padded page ids (followers call this directly)."""
        bucket = len(ids)
        new = (direction, bucket) not in self._compiled
        fn = self._fn(direction, bucket)
        if new and self.group is not None:  # every process compiled it (see ModelRunner)
            self.group.barrier(f"copy/{direction}/{bucket}")
        o, hkv = self.owner, self.host
        # Page ids go to the executable as numpy: it places them (replicated) itself, and
        # jnp.asarray would compile a staging program per new shape.
        if hkv.memory_kind is None:
            if direction == "d2h":
                pk, pv = fn(o.k, o.v, ids)
                # np.asarray waits for the gather: the numpy tier is synchronous by nature.
                for page, name in ((pk, "k"), (pv, "v")):
                    for shard in page.addressable_shards:
                        getattr(self._host_of[shard.device], name)[:, hids] = np.asarray(shard.data)
                return _Ready()
            shape = (o.k.shape[0], bucket, *o.k.shape[2:])
            pk, pv = (
                jax.make_array_from_single_device_arrays(
                    shape,
                    self._kv_sharding,
                    # each shard's pages straight to its own device (fancy indexing copies,
                    # so the device array never aliases the host pool)
                    [jax.device_put(getattr(s, name)[:, hids], s.device) for s in hkv.shards],
                )
                for name in ("k", "v")
            )
            o.k, o.v, marker = fn(o.k, o.v, ids, pk, pv)
            return marker
        if direction == "d2h":
            hkv.k, hkv.v, marker = fn(o.k, o.v, hkv.k, hkv.v, ids, hids)
            return marker
        # The host ids must sit in host memory (XLA refuses a gather across memory spaces).
        hids_host = jax.device_put(hids, replicated(self._host_sharding))
        o.k, o.v, marker = fn(o.k, o.v, hkv.k, hkv.v, ids, hids_host)
        return marker

    # ---- completion ------------------------------------------------------------------------
    def poll(self) -> list[TransferHandle]:
        """Handles that finished (or failed) since the last poll, in issue order."""
        out = []
        for h in list(self.in_flight.values()):
            if h.error is None:
                try:
                    if not all(m.is_ready() for m in h.markers):
                        continue
                except Exception as e:  # an asynchronous failure of the copy
                    h.error = e
            self._complete(h)
            out.append(h)
        return out

    def wait(
        self, handles: Sequence[TransferHandle] | None = None, timeout: float = 60.0
    ) -> list[TransferHandle]:
        """Block until ``handles`` (default: all in flight) are done or ``timeout`` seconds
        pass (a deferred copy); returns what finished."""
        want = {h.id for h in handles} if handles is not None else set(self.in_flight)
        out: list[TransferHandle] = []
        deadline = time.perf_counter() + timeout
        while want & set(self.in_flight):
            for h in list(self.in_flight.values()):
                if h.id in want and h.error is None:
                    arrays = [m for m in h.markers if isinstance(m, jax.Array)]
                    try:
                        jax.block_until_ready(arrays)
                    except Exception as e:
                        h.error = e
            out += self.poll()
            if want & set(self.in_flight):
                if time.perf_counter() > deadline:
                    break
                time.sleep(1e-4)  # a deferred (non-jax) marker
        return out

    def _complete(self, h: TransferHandle) -> None:
        now = time.perf_counter()
        h.completed_at = h._ready_at or now
        del self.in_flight[h.id]
        if h.error is not None:
            self.failed += 1
            return
        self.completed += 1
        # Copies in one direction run back to back, so time each from when it could start.
        start = max(h.issued_at, self._last_done[h.direction])
        self._last_done[h.direction] = h.completed_at
        # Every shard moved its part over its own link at once: the estimate is per shard.
        self.bandwidth.observe(h.direction, h.nbytes // self.num_shards, h.completed_at - start)


class _Ready:
    """Marker of a copy that completed synchronously."""

    def is_ready(self) -> bool:
        return True


def _record_landings(handles: queue.SimpleQueue[TransferHandle | None]) -> None:
    """The waiter thread: records *when* each copy landed (for the bandwidth estimate);
    ``poll()`` decides what is done. ``None`` stops it."""
    while (h := handles.get()) is not None:
        try:
            jax.block_until_ready([m for m in h.markers if isinstance(m, jax.Array)])
            h._ready_at = time.perf_counter()
        except Exception:  # poll() surfaces the error
            pass
