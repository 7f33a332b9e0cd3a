"""Engine throughput on the default model: prefill tok/s, decode tok/s at several batch sizes,
peak memory, roofline fraction, and (optionally) Hugging Face transformers in the same run.

    python bench/bench_engine.py [--batches 1,8,32] [--prefill 512] [--hf-python /path/to/python]
                                 [--out results.json]

``--hf-python`` points at an interpreter that has torch + transformers + gguf (see
tests/golden/make_golden.py for how to make one); it measures HF's eager f32 model on the same
GGUF weights and the same shapes, so the ratio is taken in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.models.hub import default_model_path, resolve_model
from tokencake.runner import RowRequest

HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
path, batches, prefill, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import os
torch.set_num_threads(os.cpu_count())
m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()
out = {}
with torch.no_grad():
    ids = torch.randint(100, 40000, (1, prefill))
    m(ids); t = time.perf_counter(); m(ids); out["prefill_tok_s"] = prefill / (time.perf_counter() - t)
    for b in batches:
        ids = torch.randint(100, 40000, (b, 64))
        o = m(ids, use_cache=True); past = o.past_key_values; tok = o.logits[:, -1:].argmax(-1)
        for _ in range(3):
            o = m(tok, past_key_values=past, use_cache=True); past = o.past_key_values; tok = o.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            o = m(tok, past_key_values=past, use_cache=True); past = o.past_key_values; tok = o.logits[:, -1:].argmax(-1)
        out[f"decode_b{b}_tok_s"] = b * steps / (time.perf_counter() - t)
print(json.dumps(out))
"""


def measure(engine: LLMEngine, batches: list[int], prefill: int, steps: int) -> dict[str, float]:
    runner = engine.runner
    ps = runner.cfg.page_size
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    # Prefill: one prompt of `prefill` tokens as one chunk.
    blocks = engine.pool.allocate(-(-prefill // ps))
    row = RowRequest("p", rng.integers(100, 40000, prefill).tolist(), 0, blocks, 0.0, 0, 1.0, 0, 0)
    runner.execute([row])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        runner.execute([row])
        times.append(time.perf_counter() - t)
    out["prefill_tok_s"] = prefill / min(times)
    engine.pool.free(blocks)
    # Decode: b sequences with a 64-token context each, `steps` decode steps.
    for b in batches:
        ctx = 64
        seqs = [engine.pool.allocate(-(-(ctx + steps + 4) // ps)) for _ in range(b)]
        rows = [
            RowRequest(
                f"s{i}", rng.integers(100, 40000, ctx).tolist(), 0, seqs[i], 0.0, 0, 1.0, 0, 0
            )
            for i in range(b)
        ]
        runner.execute(rows)
        pos = ctx
        for _ in range(3):
            runner.execute(
                [RowRequest(f"s{i}", [7], pos, seqs[i], 0.0, 0, 1.0, 0, 0) for i in range(b)]
            )
            pos += 1
        t = time.perf_counter()
        for _ in range(steps):
            runner.execute(
                [RowRequest(f"s{i}", [7], pos, seqs[i], 0.0, 0, 1.0, 0, 0) for i in range(b)]
            )
            pos += 1
        dt = time.perf_counter() - t
        out[f"decode_b{b}_tok_s"] = b * steps / dt
        out[f"decode_b{b}_step_ms"] = 1000 * dt / steps
        for s in seqs:
            engine.pool.free(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--hf-python", default=None)
    ap.add_argument(
        "--read-gbps",
        type=float,
        default=52.0,
        help="measured memory read bandwidth for the roofline",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg, params, tok, name = resolve_model(None)
    t = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(num_pages=1024, max_model_len=1024, max_num_seqs=max(batches), max_num_batched_tokens=args.prefill,
                     max_prefill_chunk=args.prefill, max_prefill_seqs=1, warmup=True),  # fmt: skip
        model_config=cfg, params=params, tokenizer=tok, model_name=name,
    )  # fmt: skip
    res: dict[str, float] = {"warmup_s": time.perf_counter() - t}
    res.update(measure(engine, batches, args.prefill, args.steps))
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weight_bytes = sum(v.nbytes for v in params.values())
    # Decode at B=1 must stream every weight once per token: that bounds tok/s from above.
    res["roofline_b1_tok_s"] = args.read_gbps * 1e9 / weight_bytes
    res["roofline_fraction_b1"] = (
        res["decode_b1_tok_s"] / res["roofline_b1_tok_s"] if 1 in batches else float("nan")
    )
    if args.hf_python:
        proc = subprocess.run(
            [args.hf_python, "-c", HF_SCRIPT, str(default_model_path()), json.dumps(batches), str(args.prefill), str(args.steps)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode == 0:
            hf = json.loads(proc.stdout.strip().splitlines()[-1])
            for k, v in hf.items():
                res[f"hf_{k}"] = v
                res[f"ratio_vs_hf_{k}"] = res[k] / v
        else:
            print("HF run failed:", proc.stderr[-2000:], file=sys.stderr)
    print(f"{'metric':32s} value")
    for k, v in res.items():
        print(f"{k:32s} {v:10.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
