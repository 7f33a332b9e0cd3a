"""Freeze the start-up heap so the cyclic garbage collector stops re-scanning it.

Once the model is loaded and every step shape is compiled, a serving process holds hundreds of
thousands of tracked objects (JAX, its compiled executables, transformers, the tokenizer) that
live as long as the process. CPython's oldest-generation collection traverses every one of
them, and it fires on its own every time the objects promoted since the last one reach a
quarter of that heap: a pause of tens to hundreds of milliseconds that lands inside whatever
runs then, usually a scheduling step. ``gc.freeze()`` moves every tracked object into a
permanent generation that collections skip; objects made later (requests, their metadata,
step plans) are tracked and collected as before. vLLM does the same once its engine has warmed
up (``vllm/utils/gc_utils.py``, ``freeze_gc_heap``).

``bench/bench_gc.py`` measures the full-collection pause with and without it.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then move every object alive now into the permanent generation; returns how
    many objects that generation holds.

    Collect first: ``gc.freeze()`` takes the heap as it is, so garbage frozen with it would
    never be reclaimed. Call it once, between the end of start-up and the first request, in a
    process the engine owns (``tokencake serve`` does; a library user decides for their own
    process). A frozen object that later becomes unreachable in a reference cycle is not
    reclaimed; one freed by its reference count is, as ever."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
