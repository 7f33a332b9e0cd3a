"""A process-wide cache of compiled step executables, keyed by the lowered program itself.

Two runners with the same model shapes, KV layout, attention backend and bucket lower their step
to the same StableHLO module: the second one reuses the first one's executable instead of
compiling it again. XLA:CPU takes seconds per step shape even for a two-layer model (most of
it in the sampler's sorts and scatters), so every engine built in one process (a benchmark
that runs one engine per policy, a notebook that rebuilds its ``LLM``, the test suite) paid
its whole warm-up again. The persistent compilation cache on disk covers the same ground
across processes; this one also works where that one is off.

The key is the module text (which carries the argument shapes, shardings and donations) and
the ids of the devices the program runs on, so a hit is always the same program on the same
devices. The cache holds at most :data:`CAPACITY` executables of each kind, least recently
used first out: XLA:CPU maps each executable's code into its own memory regions (about 330
for one step of the two-layer test model, about 15 for a KV copy kernel) and Linux caps a
process's regions (``vm.max_map_count``, 65,530 by default), so the cache must not keep every
executable it ever saw. Kinds are counted apart so that a burst of cheap copy kernels (a host
tier compiles 16) does not push out step executables that take seconds each to compile.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import jax

#: Executables kept per kind: steps ~22,000 mapped regions on XLA:CPU, copies ~1,000. A
#: runner's own table keeps its executables alive besides. (With 48 steps the fast test suite
#: peaked at 26,600 regions and compiled 35 programs a second time after dropping them.)
CAPACITY = {"step": 64, "copy": 64}

_Key = tuple[str, tuple[int, ...]]  # (module hash, device ids)
_lock = threading.Lock()
# One LRU per kind, least recently used first.
_caches: dict[str, OrderedDict[_Key, jax.stages.Compiled]] = {k: OrderedDict() for k in CAPACITY}
stats = {"hits": 0, "misses": 0}


def compile_lowered(
    lowered: jax.stages.Lowered, on: jax.Array, kind: str = "step"
) -> jax.stages.Compiled:
    """``lowered.compile()``, or the executable an earlier identical lowering compiled for
    the devices that ``on`` (an array the program takes, e.g. the KV cache) lives on.
    ``kind`` (a key of :data:`CAPACITY`) picks the budget the executable counts against."""
    cache = _caches.get(kind)
    if cache is None:
        raise ValueError(f"unknown executable kind {kind!r}; expected one of {sorted(CAPACITY)}")
    devices = tuple(sorted(d.id for d in on.sharding.device_set))
    key = (hashlib.sha256(lowered.as_text().encode()).hexdigest(), devices)
    with _lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            stats["hits"] += 1
            return hit
    # Compiled outside the lock: two threads missing on the same key compile it twice, which
    # is harmless, where holding the lock would serialise unrelated compiles.
    compiled = lowered.compile()
    with _lock:
        stats["misses"] += 1
        cache[key] = compiled
        cache.move_to_end(key)
        while len(cache) > CAPACITY[kind]:
            cache.popitem(last=False)
    return compiled


def clear() -> None:
    """Drop every cached executable (runners keep the ones they already hold)."""
    with _lock:
        for cache in _caches.values():
            cache.clear()


@contextmanager
def emptied() -> Iterator[None]:
    """Run the block with an empty cache, then put back what it held (tests: an empty cache
    for one check, without making the rest of the suite compile again)."""
    with _lock:
        saved = {k: c.copy() for k, c in _caches.items()}
    clear()
    try:
        yield
    finally:
        with _lock:
            for k, c in _caches.items():
                c.clear()
                c.update(saved[k])
