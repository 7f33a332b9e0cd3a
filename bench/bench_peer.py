"""The engine against llama.cpp on the same weights, in one interleaved run, with the roofline.

    python bench/bench_peer.py [--rounds 5] [--steps 32] [--batches 1,8,32] [--prefill 512]
                               [--layer-loop auto[,scan,...]] [--attention auto[,reference]]
                               [--pack-weights] [--no-peer]
                               [--out results.json]

The peer is llama.cpp through ``llama-cpp-python`` (the optional ``bench`` extra:
``pip install -e ".[bench]"``; it compiles llama.cpp, which takes minutes). The default GGUF
(Q4_1) is re-quantized to F32 with llama.cpp's own quantize API -- the same dequantized weights
the engine runs -- and cached next to it. llama.cpp runs with 2 threads (``--threads``),
without and with flash attention (``-fa``), non-unified KV (each sequence attends over its own
cells, like paged attention).

Every round measures each configuration once, in turn (engine and peer interleaved), so load
from other processes on a shared machine hits all of them alike; the table reports medians
over rounds and ratios of medians taken in this same run. Decode contexts are 128-255 tokens:
sequences are prefilled to 128 tokens once, and each round decodes ``--steps`` positions of the
window 128-255 (wrapping back to 128, overwriting the same KV positions).

The roofline is measured in the same run: the best read bandwidth of a jitted sum over a 1 GiB
array (both cores), divided into the bytes a batch-1 decode step must read (every weight matrix
and the LM head once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository's ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.variants import runner_options
from tokencake.models.hub import default_model_path, resolve_model
from tokencake.runner import ModelRunner, RowRequest
from tokencake.runner_config import RunnerConfig

CTX_LO, CTX_HI = 128, 256  # decode context window [lo, hi)


def read_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best read bandwidth (GB/s) of a jitted float32 sum over ``nbytes`` (all cores)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    del x
    return nbytes / best / 1e9


def decode_bytes(params: dict[str, np.ndarray], itemsize: int = 4) -> int:
    """Bytes a batch-1 decode step must read: every matrix once, the LM head once (the
    embedding lookup of one row is negligible; a tied head is the embedding itself)."""
    n = sum(v.size for k, v in params.items() if k != "embed")
    n += params["embed"].size  # the tied LM head, or the untied embedding's lookup (upper bound)
    return n * itemsize


class EngineBench:
    """The engine's runner driven directly: one compiled step per call, sampling included."""

    def __init__(
        self,
        params,
        cfg,
        layer_loop: str,
        max_rows: int,
        prefill: int,
        pack: bool,
        name: str,
        attention_backend: str = "auto",
        dtype: str = "float32",
    ) -> None:
        self.name = name
        ps = 16
        per_seq = -(-CTX_HI // ps)
        num_pages = 2 + max_rows * per_seq + -(-prefill // ps)
        self.runner = ModelRunner(
            cfg,
            params,
            RunnerConfig(
                num_pages=num_pages,
                page_size=ps,
                max_model_len=1024,
                max_num_seqs=max_rows,
                max_prefill_chunk=prefill,
                max_prefill_seqs=1,
                attention_backend=attention_backend,
                dtype=dtype,
                **{"pack_weights": pack, **runner_options(layer_loop)},
            ),  # fmt: skip
        )
        self.weight_itemsize = self.runner.model(self.runner.state).weight_dtype.itemsize
        self.tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(max_rows)]
        start = 1 + max_rows * per_seq
        self.prefill_table = list(range(start, start + -(-prefill // ps)))
        rng = np.random.default_rng(0)
        self.prompt = rng.integers(100, 40000, prefill).tolist()
        self.ctx = rng.integers(100, 40000, (max_rows, CTX_LO)).tolist()
        self.pos = {}

    def _row(self, rid, tokens, start, table) -> RowRequest:
        return RowRequest(rid, tokens, start, table, 0.0, 0, 1.0, 0, 0)

    def prefill(self) -> float:
        """Seconds of one ``len(prompt)``-token prefill chunk."""
        row = self._row("p", self.prompt, 0, self.prefill_table)
        t = time.perf_counter()
        self.runner.execute([row])
        return time.perf_counter() - t

    def setup_decode(self, b: int) -> None:
        chunk = self.runner.cfg.max_prefill_chunk
        for i in range(b):
            for start in range(0, CTX_LO, chunk):
                toks = self.ctx[i][start : start + chunk]
                self.runner.execute([self._row(f"s{i}", toks, start, self.tables[i])])
        self.pos[b] = CTX_LO

    def decode(self, b: int, steps: int) -> float:
        """Seconds per decode step of ``b`` rows, over ``steps`` steps."""
        pos = self.pos[b]
        t = time.perf_counter()
        for _ in range(steps):
            if pos >= CTX_HI:
                pos = CTX_LO
            self.runner.execute(
                [self._row(f"s{i}", [7 + i], pos, self.tables[i]) for i in range(b)]
            )
            pos += 1
        dt = time.perf_counter() - t
        self.pos[b] = pos
        return dt / steps


PEER_TYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "BF16": "LLAMA_FTYPE_MOSTLY_BF16"}


def requantized_gguf(src: Path, kind: str = "F32") -> Path:
    """``src`` re-quantized by llama.cpp to ``kind`` (a key of :data:`PEER_TYPES`: all F32, or
    BF16 matrices with F32 norms), cached beside it."""
    import llama_cpp

    dst = src.with_name(src.name.replace(".gguf", "").rsplit(".", 1)[0] + f".{kind}.gguf")
    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, PEER_TYPES[kind])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = dst.with_suffix(".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) failed with code {rc}")
    os.replace(tmp, dst)
    return dst


class LlamaCppBench:
    """llama.cpp through llama-cpp-python's low-level API: batched decode, one token per
    sequence per ``llama_decode``, logits for every row (as the engine samples every row)."""

    def __init__(
        self, gguf: Path, flash_attn: bool, threads: int, max_rows: int, prefill: int, kind: str
    ):
        import llama_cpp

        self.ll = llama_cpp
        self.name = f"llama.cpp {kind}" + (" -fa" if flash_attn else "")
        self.weight_itemsize = 2 if kind == "BF16" else 4
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_seq_max = max_rows + 1
        cp.n_ctx = (max_rows + 1) * max(1024, prefill)
        cp.n_batch = cp.n_ubatch = max(prefill, max_rows)
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False
        if hasattr(cp, "flash_attn_type"):  # llama.cpp since mid 2025; a bool before
            cp.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )  # fmt: skip
        else:
            cp.flash_attn = flash_attn
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(max(prefill, max_rows), 0, 1)
        rng = np.random.default_rng(0)
        self.prompt = rng.integers(100, 40000, prefill).tolist()
        self.ctx_tokens = rng.integers(100, 40000, (max_rows, CTX_LO)).tolist()
        self.prefill_seq = max_rows  # its own sequence id, cleared before every prefill
        self.pos = {}

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``(token, pos, seq, want_logits)`` entries."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (tok, pos, seq, out) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self.ll.llama_synchronize(self.ctx)

    def prefill(self) -> float:
        self.ll.llama_memory_seq_rm(self.mem, self.prefill_seq, 0, -1)
        n = len(self.prompt)
        toks = [(t, i, self.prefill_seq, i == n - 1) for i, t in enumerate(self.prompt)]
        t = time.perf_counter()
        self._decode(toks)
        return time.perf_counter() - t

    def setup_decode(self, b: int) -> None:
        for i in range(b):
            self.ll.llama_memory_seq_rm(self.mem, i, 0, -1)
            toks = self.ctx_tokens[i]
            self._decode([(t, p, i, p == len(toks) - 1) for p, t in enumerate(toks)])
        self.pos[b] = CTX_LO

    def decode(self, b: int, steps: int) -> float:
        pos = self.pos[b]
        t = time.perf_counter()
        for _ in range(steps):
            if pos >= CTX_HI:
                pos = CTX_LO
                for i in range(b):  # rewind: drop the window's cells, keep the 128-token prefix
                    self.ll.llama_memory_seq_rm(self.mem, i, CTX_LO, -1)
            self._decode([(7 + i, pos, i, True) for i in range(b)])
            pos += 1
        dt = time.perf_counter() - t
        self.pos[b] = pos
        return dt / steps


def interleaved(
    benches: list, batches: list[int], prefill: int, steps: int, rounds: int, log: Callable
) -> dict[str, dict[str, list[float]]]:
    """Per bench and metric, the per-round tok/s figures (all benches measured every round).
    Decode batches are set up one at a time (the same sequence ids serve every batch size)."""
    res: dict[str, dict[str, list[float]]] = {b.name: {} for b in benches}
    for bench in benches:  # warm-up: compile / first-touch every shape once, untimed
        bench.prefill()
    for r in range(rounds):
        for bench in benches:
            res[bench.name].setdefault(f"prefill {prefill}", []).append(prefill / bench.prefill())
        for bsz in batches:
            for bench in benches:
                bench.setup_decode(bsz)
                bench.decode(bsz, 2)  # untimed: first call of this shape
                sec = bench.decode(bsz, steps)
                res[bench.name].setdefault(f"decode B={bsz}", []).append(bsz / sec)
        log(f"round {r + 1}/{rounds}: " + "  ".join(
            f"{b.name} B=1 {res[b.name].get('decode B=1', [float('nan')])[-1]:.1f}" for b in benches
        ))  # fmt: skip
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per round and batch")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--layer-loop",
        default="auto",
        help="comma-separated: one engine per layer loop (the first is compared with the peer), "
        "with the suffixes of bench/variants.py: '+nofuse', '+in_out', '+bf16' (bfloat16 "
        "weights), ...",
    )
    ap.add_argument(
        "--peer-types",
        default="F32",
        help="comma-separated llama.cpp weight types, each run with and without -fa: F32 (the "
        "engine's float32 weights), BF16 (as the engine's '+bf16')",
    )
    ap.add_argument(
        "--attention",
        default="auto",
        help="comma-separated attention backends: one engine per (layer loop, backend) pair",
    )
    ap.add_argument("--pack-weights", action="store_true", help="RunnerConfig.pack_weights")
    ap.add_argument("--no-peer", action="store_true", help="engine only (no llama-cpp-python)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cfg, params, _, _ = resolve_model(None)
    combos = [(loop, attn) for loop in args.layer_loop.split(",")
              for attn in args.attention.split(",")]  # fmt: skip
    benches: list = [
        EngineBench(params, cfg, loop, max(batches), args.prefill, args.pack_weights,
                    "engine" if len(combos) == 1 else f"engine {loop}/{attn}",
                    attention_backend=attn)
        for loop, attn in combos
    ]  # fmt: skip
    engines = len(benches)
    if not args.no_peer:
        for kind in args.peer_types.split(","):
            try:
                gguf = requantized_gguf(default_model_path(), kind)
            except ImportError:
                sys.exit('llama-cpp-python is missing: pip install -e ".[bench]" (or --no-peer)')
            for fa in (False, True):
                benches.append(
                    LlamaCppBench(gguf, fa, args.threads, max(batches), args.prefill, kind)
                )
    bw = [read_bandwidth_gbps()]
    res = interleaved(benches, batches, args.prefill, args.steps, args.rounds, log)
    bw.append(read_bandwidth_gbps())
    read_gbps = max(bw)
    roof_b1 = read_gbps * 1e9 / decode_bytes(params)

    med = {n: {k: statistics.median(v) for k, v in m.items()} for n, m in res.items()}
    first = benches[0].name
    metrics = list(med[first])
    names = [b.name for b in benches]
    head = f"{'tok/s (median of ' + str(args.rounds) + ' rounds)':32s}" + "".join(
        f"{n:>18s}" for n in names
    )
    peers = names[engines:]
    if peers:
        head += f"{first + ' / best peer':>28s}"
    if engines > 1:
        head += f"{first + ' / ' + names[1]:>28s}"
    print(head)
    for m in metrics:
        line = f"{m:32s}" + "".join(f"{med[n][m]:18.1f}" for n in names)
        if peers:
            line += f"{med[first][m] / max(med[p][m] for p in peers):28.2f}"
        if engines > 1:
            line += f"{med[first][m] / med[names[1]][m]:28.2f}"
        print(line)
    print(f"\nread bandwidth (best jitted 1 GiB sum): {read_gbps:.1f} GB/s; batch-1 decode reads "
          f"{decode_bytes(params) / 1e6:.0f} MB -> roofline {roof_b1:.1f} tok/s")  # fmt: skip
    if "decode B=1" in med[first]:
        for b in benches:  # a bfloat16 engine or peer reads half the bytes: its own roofline
            roof = read_gbps * 1e9 / decode_bytes(params, b.weight_itemsize)
            print(f"  {b.name}: B=1 at {med[b.name]['decode B=1'] / roof:.0%} of the "
                  f"{roof:.1f} tok/s roofline of {b.weight_itemsize}-byte weights")  # fmt: skip
    if args.out:
        out = {"rounds": res, "median": med, "read_gbps": read_gbps, "roofline_b1": roof_b1,
               "args": vars(args)}  # fmt: skip
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
