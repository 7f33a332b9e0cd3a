"""One-command GPU check of the pallas-gpu attention kernel: correctness, speed, engine tok/s.

Usage (on a machine with a GPU; the whole run takes well under 5 minutes)::

    python bench/gpu_check.py --report gpu_check.json [--with-engine]

and, to test this script itself on a CPU (interpret mode, tiny shapes, a few seconds)::

    python bench/gpu_check.py --cpu-smoke --report /tmp/gpu_check_smoke.json

It prints the jax version and devices, then

1. correctness: the max abs error of pallas-gpu against the reference backend on a few realistic
   mixed prefill+decode batches (float32 and bfloat16);
2. speed: one layer's attention, reference vs pallas-gpu, for decode batches of 1/8/32 sequences
   at context 512 and 2048 and for a 512-token prefill chunk (SmolLM2-135M shapes: Hq 9, Hkv 3,
   D 64, page 16);
3. decode at the roofline (issue 17 item 6): the model runner's decode step at batch 1 and 32
   (context 128-255) with each attention backend, against the roofline of this device: the
   bytes a batch-1 step must read over the measured read bandwidth of a jitted sum (on a GPU,
   HBM). The default model, and a 1B-class model when a local checkpoint is given
   (``--model-1b PATH`` or ``TOKENCAKE_GPU_CHECK_1B``; recorded as skipped otherwise);
4. KV transfers (issue 17 item 5): the engine's host<->device page copies against a raw
   ``device_put`` of the same bytes, and the copy-out split into gather / transfer / scatter
   (``bench_transfer.py``). On a GPU the gather and scatter run in HBM and the link (PCIe) is
   the bound, so the fused copy should reach the raw ``device_put``;
5. with ``--with-engine`` and when ``tokencake.LLM`` exists: the engine's end-to-end generation
   tokens/s (``LLM.generate``, 32 prompts) with each attention backend.

Every figure goes into the JSON report, which is rewritten after each section so that a run cut
short still leaves what it measured. Errors in one section are recorded and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository's ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_peer import CTX_LO, EngineBench, decode_bytes, read_bandwidth_gbps
from bench.bench_transfer import bench_decomposition, bench_throughput
from tokencake.models.attention import pallas_gpu
from tokencake.models.attention.reference import reference_paged_attention

# SmolLM2-135M attention shapes (the engine's default model).
SMOL = {"hq": 9, "hkv": 3, "d": 64, "page": 16}
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def make_inputs(
    rows: list[tuple[int, int]],
    *,
    hq: int,
    hkv: int,
    d: int,
    page: int,
    dtype: str,
    seed: int = 0,
) -> tuple[jax.Array, ...]:
    """A ragged batch: row ``s`` has ``rows[s] = (q_len, kv_len)``, its pages scattered at random.

    Block tables are padded with the dummy page 0; every row gets as many columns as the longest.
    """
    rng = np.random.default_rng(seed)
    npages = [-(-kv // page) for _, kv in rows]
    width = max(max(npages), 1)
    num_pages = sum(npages) + 1
    order = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(rows), width), np.int32)
    nxt = 0
    for s, n in enumerate(npages):
        tables[s, :n] = order[nxt : nxt + n]
        nxt += n
    qn = max(max(q for q, _ in rows), 1)
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((len(rows), qn, hq, d), np.float32), dt)
    k = jnp.asarray(rng.standard_normal((num_pages, page, hkv, d), np.float32), dt)
    v = jnp.asarray(rng.standard_normal((num_pages, page, hkv, d), np.float32), dt)
    return (
        q,
        k,
        v,
        jnp.asarray(tables),
        jnp.asarray([r[0] for r in rows], jnp.int32),
        jnp.asarray([r[1] for r in rows], jnp.int32),
    )


def time_fn(fn: Callable[[], jax.Array], iters: int) -> dict[str, float]:
    """Compile-and-warm once, then time ``iters`` calls; milliseconds per call."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - t0)
    return {
        "first_call_s": round(first, 3),
        "median_ms": round(1e3 * statistics.median(samples), 4),
        "min_ms": round(1e3 * min(samples), 4),
        "iters": iters,
    }


def correctness(smoke: bool, interpret: bool) -> list[dict[str, Any]]:
    """pallas-gpu vs reference on mixed batches; each entry has the error and its tolerance."""
    if smoke:
        cases = [
            ("smollm-mixed", SMOL, [(12, 40), (1, 1), (1, 33), (0, 0)]),
            ("gqa4-page32", {"hq": 8, "hkv": 2, "d": 32, "page": 32}, [(7, 7), (1, 65), (0, 0)]),
        ]
    else:
        mixed = [(512, 1536), (1, 1), (1, 513), (1, 2047), (37, 100), (0, 0)]
        cases = [
            ("smollm-mixed", SMOL, mixed),
            ("smollm-decode32", SMOL, [(1, 100 + 61 * i) for i in range(32)]),
            ("llama8b-mixed", {"hq": 32, "hkv": 8, "d": 128, "page": 16}, mixed),
            ("gqa8-page32", {"hq": 8, "hkv": 1, "d": 128, "page": 32}, mixed),
        ]
    attn = jax.jit(pallas_gpu.pallas_paged_attention, static_argnames=("scale", "interpret"))
    ref = jax.jit(reference_paged_attention, static_argnames="scale")
    results = []
    for name, shape, rows in cases:
        for dtype in ("float32", "bfloat16"):
            args = make_inputs(rows, dtype=dtype, **shape)
            scale = shape["d"] ** -0.5
            got = attn(*args, scale=scale, interpret=interpret)
            want = ref(*args, scale=scale)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            ok = bool(np.isfinite(err) and err <= TOLERANCE[dtype])
            entry = {"case": name, "dtype": dtype, **shape, "rows": rows, "max_abs_err": err,
                     "tolerance": TOLERANCE[dtype], "ok": ok}  # fmt: skip
            print(f"  {name:18s} {dtype:9s} max abs err {err:.3e} (tol {TOLERANCE[dtype]:g}) "
                  f"{'OK' if ok else 'FAIL'}")  # fmt: skip
            results.append(entry)
    return results


def speed(smoke: bool, interpret: bool, dtype: str) -> list[dict[str, Any]]:
    """One layer's attention time, reference vs pallas-gpu, decode batches and a prefill chunk."""
    if smoke:
        configs = [("decode", b, ctx) for b in (1, 2) for ctx in (32, 64)] + [("prefill", 1, 32)]
        iters = 2
    else:
        configs = [("decode", b, ctx) for b in (1, 8, 32) for ctx in (512, 2048)]
        configs += [("prefill", 1, 512), ("prefill-after-1536", 1, 2048)]
        iters = 30
    attn = jax.jit(pallas_gpu.pallas_paged_attention, static_argnames=("scale", "interpret"))
    ref = jax.jit(reference_paged_attention, static_argnames="scale")
    scale = SMOL["d"] ** -0.5
    results = []
    for kind, batch, ctx in configs:
        q_len = 1 if kind == "decode" else (32 if smoke else 512)
        args = make_inputs([(q_len, ctx)] * batch, dtype=dtype, **SMOL)
        entry: dict[str, Any] = {"kind": kind, "batch": batch, "context": ctx, "q_len": q_len,
                                 "dtype": dtype, **SMOL}  # fmt: skip
        entry["reference"] = time_fn(lambda a=args: ref(*a, scale=scale), iters)
        entry["pallas_gpu"] = time_fn(
            lambda a=args: attn(*a, scale=scale, interpret=interpret), iters
        )
        speedup = entry["reference"]["median_ms"] / max(entry["pallas_gpu"]["median_ms"], 1e-9)
        entry["speedup"] = round(speedup, 3)
        print(f"  {kind:18s} batch {batch:3d} ctx {ctx:5d}: reference "
              f"{entry['reference']['median_ms']:8.3f} ms, pallas-gpu "
              f"{entry['pallas_gpu']['median_ms']:8.3f} ms (x{speedup:.2f})")  # fmt: skip
        results.append(entry)
    return results


def roofline(backends: list[str], model_1b: str | None, dtype: str, smoke: bool) -> dict:
    """Runner-level decode tok/s at batch 1 and 32 per model and attention backend, with the
    batch-1 roofline (read bandwidth / bytes read per step) and each figure's share of it."""
    from tokencake.models.hub import resolve_model

    itemsize = 2 if dtype == "bfloat16" else 4
    gbps = read_bandwidth_gbps(nbytes=(64 << 20) if smoke else (1 << 30))
    out: dict[str, Any] = {"read_gbps": gbps, "models": []}
    print(f"  read bandwidth {gbps:.1f} GB/s")
    models: list[tuple[str, Callable[[], tuple]]] = []
    if smoke:  # the tiny random model: tests this script, not the device
        from tokencake.models.config import tiny_config
        from tokencake.models.weights import random_params

        models.append(("tiny", lambda: (tiny_config(), random_params(tiny_config(), 0))))
    else:
        models.append(("default", lambda: resolve_model(None)[:2]))
    if model_1b and Path(model_1b).exists():
        models.append((model_1b, lambda: resolve_model(model_1b)[:2]))
    else:
        out["model_1b"] = {"skipped": f"no 1B-class checkpoint at {model_1b!r}"}
    batches, steps = ((1, 2), 2) if smoke else ((1, 32), 32)
    for name, load in models:
        cfg, params = load()
        need = decode_bytes(params, itemsize)
        roof = gbps * 1e9 / need
        entry: dict[str, Any] = {"model": name, "bytes_per_b1_step": need,
                                 "roofline_b1_tok_s": roof, "backends": {}}  # fmt: skip
        print(f"  {name}: {need / 1e6:.0f} MB per batch-1 step -> roofline {roof:.1f} tok/s")
        for backend in backends:
            try:
                eb = EngineBench(params, cfg, "auto", max(batches), 32, False, backend,
                                 attention_backend=backend, dtype=dtype)  # fmt: skip
                res = {}
                for b in batches:
                    eb.setup_decode(b)
                    eb.decode(b, 2)  # compile / settle
                    sec = min(eb.decode(b, steps) for _ in range(3))
                    res[f"B={b}"] = b / sec
                res["b1_of_roofline"] = (
                    res["B=1"] / roof
                )  # unrounded: the tiny model's share is ~0.01
                print(f"    {backend:11s}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
            except Exception as e:  # one backend failing must not hide the other
                res = {"error": f"{type(e).__name__}: {e}"}
                print(f"    {backend}: FAILED {res['error']}")
            entry["backends"][backend] = res
        out["models"].append(entry)
    out["context"] = f"{CTX_LO}-255"
    return out


def transfers(smoke: bool) -> dict:
    """The engine's KV copies vs a raw ``device_put`` (1/16/256 blocks of the default model's
    page size), and the 256-block copy-out split into its pieces."""
    repeats = 2 if smoke else 7
    thr = bench_throughput(repeats)
    for r in thr:
        if "blocks" in r:
            print(f"  {r['direction']} {r['blocks']:4d} blocks: engine {r['engine_gbps']:7.2f} "
                  f"GB/s, raw device_put {r['raw_device_put_gbps']:7.2f} GB/s, "
                  f"ratio {r['ratio']:.2f}")  # fmt: skip
    split = bench_decomposition(repeats)
    if "engine_vs_raw" in split:
        print(
            "  copy-out split (GB/s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in split["gbps"].items())
        )
    return {"throughput": thr, "copy_out_split": split}


def engine_decode(backends: list[str], model: str | None, dtype: str, smoke: bool) -> list[dict]:
    """Decode tokens/s of the engine facade with each attention backend (skipped if absent)."""
    import tokencake

    llm_cls = getattr(tokencake, "LLM", None)
    if llm_cls is None:  # the facade's module, while the package does not re-export it yet
        try:
            from tokencake.llm import LLM as llm_cls
        except ImportError:
            llm_cls = None
    if llm_cls is None:
        print("  tokencake.LLM does not exist; skipping the engine check")
        return [{"skipped": "tokencake.LLM does not exist"}]
    from tokencake.sampling_params import SamplingParams

    num_prompts, max_tokens = (2, 8) if smoke else (32, 128)
    results = []
    for backend in backends:
        entry: dict[str, Any] = {"backend": backend, "dtype": dtype, "prompts": num_prompts,
                                 "max_tokens": max_tokens}  # fmt: skip
        try:
            t0 = time.perf_counter()
            llm = llm_cls(model=model, attention_backend=backend, dtype=dtype)
            entry["load_s"] = round(time.perf_counter() - t0, 2)
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            prompts = [f"Write a short story about agent number {i}." for i in range(num_prompts)]
            llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - t0
            generated = sum(len(o.token_ids) for o in outs)
            entry.update(generated_tokens=generated, elapsed_s=round(elapsed, 3),
                         tokens_per_s=round(generated / elapsed, 1))  # fmt: skip
            print(f"  engine {backend:11s}: {generated} tokens in {elapsed:.2f} s = "
                  f"{generated / elapsed:.1f} tok/s")  # fmt: skip
            entry["stall_free"] = stall_free_room(llm.engine.runner)
        except Exception as e:  # record and go on: one backend failing must not hide the other
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"  engine {backend}: FAILED {entry['error']}")
        results.append(entry)
    return results


def stall_free_room(runner: Any) -> dict[str, Any]:
    """What stall-free prefill (scheduler/stall_free.py) would allow on this device: the
    engine's warm-up profile (one-row floor, prefill fit) and the free prefill tokens beside
    1 / 8 / 32 decode rows. On the CPU the room is 0; on a GPU it should be large."""
    from tokencake.diagnostics import profile_step_costs
    from tokencake.memory.cost_model import CostModel

    cost = CostModel(bytes_per_block=1)
    profile_step_costs(runner, cost)
    room = {f"rows={r}": cost.free_prefill_tokens(r, 0) for r in (1, 8, 32)}
    print(f"  stall-free room: floor {cost.step_floor_s * 1e3:.2f} ms, prefill "
          f"{cost.recompute_a * 1e3:.2f} ms + {cost.recompute_b * 1e6:.1f} us/token: {room}")  # fmt: skip
    return {"step_floor_ms": round(cost.step_floor_s * 1e3, 3),
            "prefill_a_ms": round(cost.recompute_a * 1e3, 3),
            "prefill_b_us": round(cost.recompute_b * 1e6, 3), "room_tokens": room}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", required=True, help="where to write the JSON report")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes in interpret mode, to test this script on a CPU")  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype of the timed attention and of the engine")  # fmt: skip
    ap.add_argument("--with-engine", action="store_true", help="also time the engine's decode")
    ap.add_argument("--engine-backends", default="pallas-gpu,reference")
    ap.add_argument("--engine-model", default=None, help="model for the engine (default model)")
    ap.add_argument("--model-1b", default=os.environ.get("TOKENCAKE_GPU_CHECK_1B"),
                    help="a local 1B-class checkpoint for the roofline section")  # fmt: skip
    args = ap.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.cpu_smoke:
        print(
            f"no GPU (jax backend {jax.default_backend()!r}); pass --cpu-smoke to test the script"
        )
        return 2
    interpret = not on_gpu
    report: dict[str, Any] = {
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kinds": sorted({d.device_kind for d in jax.devices()}),
        "interpret": interpret,
        "smoke": args.cpu_smoke,
        "kernel_constants": {
            n: getattr(pallas_gpu, n)
            for n in (
                "MAX_BLOCK_ROWS",
                "MIN_BLOCK_ROWS",
                "KV_BLOCK_TOKENS",
                "TARGET_PROGRAMS",
                "MAX_KV_SPLITS",
                "NUM_WARPS",
                "NUM_STAGES",
            )
        },  # fmt: skip
        "errors": [],
    }
    print(f"jax {jax.__version__} on {jax.default_backend()}: {report['devices']}")

    def write() -> None:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)

    sections: list[tuple[str, Callable[[], Any]]] = [
        ("correctness", lambda: correctness(args.cpu_smoke, interpret)),
        ("speed", lambda: speed(args.cpu_smoke, interpret, args.dtype)),
        (
            "roofline",
            lambda: roofline(
                [b.strip() for b in args.engine_backends.split(",") if b.strip()],
                args.model_1b,
                args.dtype,
                args.cpu_smoke,
            ),
        ),  # fmt: skip
        ("transfers", lambda: transfers(args.cpu_smoke)),
    ]
    if args.with_engine:
        backends = [b.strip() for b in args.engine_backends.split(",") if b.strip()]
        sections.append(("engine", lambda: engine_decode(
            backends, args.engine_model, args.dtype, args.cpu_smoke)))  # fmt: skip
    for name, run in sections:
        print(f"[{name}]")
        t0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception as e:  # keep going: later sections are independent
            report["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()})  # fmt: skip
            print(f"  FAILED: {type(e).__name__}: {e}")
        report[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        write()
    ok = not report["errors"] and all(c["ok"] for c in report.get("correctness", []))
    report["ok"] = ok
    if "engine" in report:  # reported apart: the engine may fail for reasons beyond attention
        report["engine_ok"] = not any("error" in e for e in report["engine"])
    write()
    print(f"report written to {args.report}; {'all OK' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
