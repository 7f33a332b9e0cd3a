"""The start-up heap freeze (``tokencake/gc_heap.py``): garbage is collected before the freeze,
frozen objects leave every generation, objects made afterwards are still collected, and the
server's engine loader freezes its heap. Each check runs in a child process: a freeze is for
the whole process, and the test process must keep collecting its own heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.fixtures_models import write_gguf
from tokencake.models.config import tiny_config
from tokencake.models.tokenizer import Tokenizer
from tokencake.models.weights import random_params

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_freeze_collects_first_then_skips_the_heap_but_not_later_objects():
    out = _run(
        """
        import gc, weakref
        from tokencake.gc_heap import freeze_startup_heap

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.peer, b.peer = b, a
            return a

        gc.disable()  # no automatic collection: only the calls below collect
        garbage = weakref.ref(cycle())  # unreachable cycle made before the freeze
        kept = cycle()  # reachable at the freeze
        assert garbage() is not None
        n = freeze_startup_heap()
        assert garbage() is None, "garbage was frozen instead of collected"
        assert n == gc.get_freeze_count() > 0
        young = sum(len(gc.get_objects(g)) for g in range(3))
        assert all(o is not kept for g in range(3) for o in gc.get_objects(g))
        later = weakref.ref(cycle())  # garbage made after the freeze
        gc.collect()
        assert later() is None, "an object made after the freeze was not collected"
        print(n, young)
        """
    )
    frozen, tracked = map(int, out.split())
    assert frozen > 1000 and tracked < frozen  # the imports' heap is frozen, little is left


def test_the_server_loader_freezes_the_engine_heap(tmp_path):
    cfg = tiny_config()
    gguf = write_gguf(
        tmp_path / "tiny.gguf", cfg, random_params(cfg), Tokenizer.byte_level_for_tests()
    )
    out = _run(
        f"""
        import gc
        from tokencake.config import EngineConfig
        from tokencake.server.run import _load_engine

        engine = _load_engine(EngineConfig(model={str(gguf)!r}, max_model_len=64,
                                           max_num_seqs=2, warmup=False), progress=False)
        print(gc.get_freeze_count(), len(gc.get_objects(2)))
        engine.close()
        """
    )
    frozen, oldest = map(int, out.split())
    assert frozen > 10_000 and oldest < frozen // 10
