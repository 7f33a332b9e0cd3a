"""Weights packed into one huge-page host buffer, in the order a decode step reads them.

On the CPU backend a decode step streams every weight matrix from memory once, so where the
matrices live matters: spread over many 4 KiB-page allocations, each matrix costs a TLB miss
every 4 KiB and the hardware prefetchers stop at every page boundary. :class:`HostArena` packs
the arrays back to back into one 2 MiB-aligned anonymous mapping advised ``MADV_HUGEPAGE``
(honoured when transparent huge pages are ``always`` or ``madvise``), and hands out CPU device
arrays that alias the packed bytes (``jax.device_put`` of a 64-byte-aligned numpy array does not
copy on the CPU backend). Nothing is kept alive by the arena itself: the device arrays hold
their numpy views, which hold the mapping.
"""

from __future__ import annotations

import contextlib
import mmap

import jax
import numpy as np

HUGE_PAGE = 2 << 20
ALIGN = 64  # XLA:CPU aliases host buffers aligned to this; it copies anything less aligned


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class HostArena:
    """A bump allocator over one huge-page-advised mapping of ``nbytes`` (plus alignment)."""

    def __init__(self, nbytes: int) -> None:
        self._map = mmap.mmap(-1, nbytes + HUGE_PAGE)
        advise = getattr(mmap, "MADV_HUGEPAGE", None)
        if advise is not None:
            # THP disabled in this kernel: plain pages, still packed.
            with contextlib.suppress(OSError):
                self._map.madvise(advise)
        base = np.frombuffer(self._map, np.uint8)
        start = (-base.ctypes.data) % HUGE_PAGE
        self._buf = base[start : start + nbytes]
        self._used = 0

    @staticmethod
    def size_of(arrays, dtype) -> int:
        """Bytes an arena needs for ``arrays`` stored as ``dtype`` (alignment included)."""
        item = np.dtype(dtype).itemsize
        return sum(_round_up(int(np.prod(np.shape(a))) * item, ALIGN) for a in arrays)

    def put(self, value, dtype) -> jax.Array:
        """Copy ``value`` into the arena as ``dtype`` and return a CPU array over those bytes."""
        dtype = np.dtype(dtype)
        shape = np.shape(value)
        n = int(np.prod(shape)) * dtype.itemsize
        if self._used + n > self._buf.size:
            raise ValueError(f"arena of {self._buf.size} bytes cannot hold {n} more")
        view = self._buf[self._used : self._used + n].view(dtype).reshape(shape)
        view[...] = value
        self._used = _round_up(self._used + n, ALIGN)
        return jax.device_put(view, jax.devices("cpu")[0])
