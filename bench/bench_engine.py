"""Engine throughput on the default model: prefill tok/s, decode tok/s at several batch sizes,
peak memory, roofline fraction, and (optionally) Hugging Face transformers in the same run.

    python bench/bench_engine.py [--batches 1,8,32] [--prefill 512] [--hf-python /path/to/python]
                                 [--out results.json]

``--overlap`` measures overlap scheduling instead (issue 17 item 3): a decode-heavy run of
``--rows`` (64) running requests under the ``tokencake`` policy with ``--queue`` (1,000)
annotated requests waiting, ``EngineConfig.overlap`` off and on in interleaved rounds on one
engine. It prints the wall time per step, generated tok/s and the device idle time between
step calls (a helper thread timestamps when each call's result is ready; ``--model tiny`` is
the test suite's random tiny model, whose short steps show the host's share):

    python bench/bench_engine.py --overlap [--model default|tiny] [--rounds 3] [--steps 40]

``--fused`` measures fused steps instead (issue 17 item 2): ``--rows`` - 1 (7) requests decode while
a queue of prompts prefills one chunk per step beside them, so every step holds decode rows and
a prefill chunk. One engine built with ``fused_steps=True`` runs interleaved rounds with fusion
on and off (``ModelRunner.set_fused_steps``: the same weights and executables); it prints the
wall time per round, the share of mixed steps that ran fused, and the on/off ratio:

    python bench/bench_engine.py --fused [--model default|tiny] [--rounds 3] [--rows 8]
                                 [--prompts 6] [--prompt-len 192] [--chunk 64]

``--hf-python`` points at an interpreter that has torch + transformers + gguf (see
tests/golden/make_golden.py for how to make one); it measures HF's eager f32 model on the same
GGUF weights and the same shapes, so the ratio is taken in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.models.hub import default_model_path, resolve_model
from tokencake.runner import RowRequest
from tokencake.sampling_params import SamplingParams

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_schedule import annotated_metadata  # noqa: E402

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


class DeviceTimeline:
    """When each step call was dispatched (its dispatch returned) and when the device finished
    it (a helper thread blocks on its result), so the device's idle time between calls is
    measured rather than inferred: call ``i`` waits for the device from ``done[i-1]`` (if the
    device was idle) until it is dispatched."""

    def __init__(self, runner) -> None:
        self.calls: list[tuple[float, float]] = []  # (dispatched, done), in dispatch order
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.dispatched = 0
        orig = runner._dispatch_call

        def timed(*args, **kwargs):
            res, tokens = orig(*args, **kwargs)
            t = time.perf_counter()
            self.dispatched += 1
            self._q.put((t, res.tokens))
            return res, tokens

        runner._dispatch_call = timed
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while True:
            t, arr = self._q.get()
            arr.block_until_ready()
            self.calls.append((t, time.perf_counter()))

    def idle(self, t0: float, t1: float) -> tuple[float, int]:
        """Seconds the device waited for the host between calls dispatched in ``[t0, t1]``,
        and how many calls that was. Waits until every call dispatched so far has finished."""
        while len(self.calls) < self.dispatched:
            time.sleep(0.001)
        idle, n, prev_done = 0.0, 0, None
        for dispatched, done in self.calls:
            if t0 <= dispatched <= t1:
                if prev_done is not None:
                    idle += max(0.0, dispatched - prev_done)
                n += 1
            prev_done = done
        return idle, n


def overlap_round(
    engine: LLMEngine, timeline: DeviceTimeline, args, seed: int, tag: str
) -> dict[str, float]:
    """One measured run: ``--queue`` annotated requests queued, the running set filled to
    ``--rows``, then ``--steps`` timed engine steps; finally everything aborted and drained."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    ids = []
    for n in range(args.queue):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(16, 64))]
        sp = SamplingParams(max_tokens=rng.randrange(64, 256), ignore_eos=True)
        ids.append(engine.add_request(prompt, sp, f"{tag}-{n}", metadata=annotated_metadata(n)))
    for _ in range(200):  # fill the running set (prefills), untimed
        engine.step()
        if len(engine.scheduler.running) >= args.rows and not any(
            r.is_prefill for r in engine.scheduler.running
        ):
            break
    for _ in range(3):
        engine.step()
    tokens, t0 = 0, time.perf_counter()
    for _ in range(args.steps):
        tokens += sum(len(o.delta_token_ids) for o in engine.step())
    t1 = time.perf_counter()
    idle, calls = timeline.idle(t0, t1)
    running = len(engine.scheduler.running)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    wall = t1 - t0
    return {"step_ms": 1e3 * wall / args.steps, "tok_s": tokens / wall,
            "idle_ms_per_step": 1e3 * idle / args.steps, "idle_frac": idle / wall,
            "calls_per_step": calls / args.steps, "running": running}  # fmt: skip


def fused_round(engine: LLMEngine, args, seed: int, tag: str) -> dict[str, float]:
    """One measured run: ``--rows`` - 1 requests brought to decoding (untimed), then ``--prompts``
    prompts of ``--prompt-len`` tokens queued (one token each to generate) and the engine
    stepped until they finish, timed, while the rows keep decoding; then all aborted."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    runner = engine.runner
    ids = []
    for n in range(args.rows - 1):  # one seat (max_num_seqs = --rows) left for the prompts
        prompt = [rng.randrange(3, vocab) for _ in range(32)]
        sp = SamplingParams(max_tokens=512, ignore_eos=True)  # aborted at the end of the round
        ids.append(engine.add_request(prompt, sp, f"{tag}-d{n}"))
    for _ in range(100):
        engine.step()
        if not any(r.is_prefill for r in engine.scheduler.running):
            break
    queued = []
    for n in range(args.prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
        queued.append(engine.add_request(prompt, SamplingParams(max_tokens=1), f"{tag}-p{n}"))
    before = dict(runner.fused_counts)
    left, steps, t0 = set(queued), 0, time.perf_counter()
    while left:
        left -= {o.request_id for o in engine.step() if o.finished}
        steps += 1
    wall = time.perf_counter() - t0
    mixed = {k: runner.fused_counts[k] - before[k] for k in before}
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return {"wall_s": wall, "steps": steps, "step_ms": 1e3 * wall / steps,
            "fused_steps": mixed["fused"], "unfused_mixed_steps": mixed["unfused"]}  # fmt: skip


def engine_model(model: str) -> tuple:
    """``(config, params, tokenizer, name)`` of ``--model``: ``tiny`` (random weights, byte
    tokenizer) or the default model."""
    if model == "tiny":
        from tokencake.models.config import tiny_config
        from tokencake.models.tokenizer import Tokenizer
        from tokencake.models.weights import random_params

        cfg = tiny_config(max_position_embeddings=1024)
        return cfg, random_params(cfg, 0), Tokenizer.byte_level_for_tests(), "tiny"
    return resolve_model(None)


def measure_fused(args) -> None:
    """Fused steps on vs off, interleaved rounds on one engine (module docstring)."""
    import os

    cfg, params, tok, name = engine_model(args.model)
    # One prefill chunk per step (max_prefill_seqs=1) beside the decode rows: every mixed
    # step's shapes are in the fused family. No prefix cache: both modes of a round see the
    # same prompts, and the second would otherwise skip the prefill the first cached.
    engine = LLMEngine(
        EngineConfig(num_pages=512, max_model_len=1024, max_num_seqs=max(args.rows, 1),
                     max_num_batched_tokens=args.chunk + args.rows, max_prefill_chunk=args.chunk,
                     max_prefill_seqs=1, fused_steps=True, enable_prefix_cache=False,
                     warmup=False),
        model_config=cfg, params=params, tokenizer=tok, model_name=name,
    )  # fmt: skip
    runner = engine.runner
    runner.set_fused_steps(True)
    fused_round(engine, args, seed=998, tag="warm-on")  # compiles the shapes used; not counted
    runner.set_fused_steps(False)
    fused_round(engine, args, seed=999, tag="warm-off")
    res: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            runner.set_fused_steps(mode == "on")
            res[mode].append(fused_round(engine, args, seed=r, tag=f"{mode}{r}"))
            print(f"round {r} fused {mode:3s}: " + "  ".join(
                f"{k} {v:.3f}" for k, v in res[mode][-1].items()), flush=True)  # fmt: skip
    print(f"model {name}, {args.rows} decode rows, {args.prompts} prompts x {args.prompt_len} "
          f"tokens in chunks of {args.chunk}, {args.rounds} rounds; load {os.getloadavg()}")  # fmt: skip
    print(f"{'median':18s} {'off':>10s} {'on':>10s} {'on/off':>8s}")
    for k in ("wall_s", "step_ms", "steps", "fused_steps", "unfused_mixed_steps"):
        off = statistics.median(x[k] for x in res["off"])
        on = statistics.median(x[k] for x in res["on"])
        print(f"{k:18s} {off:10.3f} {on:10.3f} {on / off if off else float('nan'):8.3f}")


def measure_overlap(args) -> None:
    """Overlap scheduling off vs on, interleaved rounds on one engine (module docstring)."""
    import os

    sys.setswitchinterval(0.0005)  # the timeline thread must not wait 5 ms for the GIL
    cfg, params, tok, name = engine_model(args.model)
    engine = LLMEngine(
        EngineConfig(num_pages=64 * 24 + 64, max_model_len=512, max_num_seqs=args.rows,
                     max_num_batched_tokens=512, max_prefill_chunk=256, max_prefill_seqs=4,
                     policy="tokencake", warmup=False),
        model_config=cfg, params=params, tokenizer=tok, model_name=name,
    )  # fmt: skip
    timeline = DeviceTimeline(engine.runner)
    res: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    engine.set_overlap(False)
    overlap_round(
        engine, timeline, args, seed=999, tag="warm"
    )  # compiles the shapes used; not counted
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            engine.set_overlap(mode == "on")
            res[mode].append(overlap_round(engine, timeline, args, seed=r, tag=f"{mode}{r}"))
            print(f"round {r} overlap {mode:3s}: " + "  ".join(
                f"{k} {v:.3f}" for k, v in res[mode][-1].items()), flush=True)  # fmt: skip
    print(f"model {name}, {args.rows} rows, queue {args.queue}, policy tokencake, "
          f"{args.steps} timed steps x {args.rounds} rounds; load {os.getloadavg()}")  # fmt: skip
    print(f"{'median':18s} {'off':>10s} {'on':>10s} {'on/off':>8s}")
    for k in ("step_ms", "tok_s", "idle_ms_per_step", "idle_frac"):
        off = statistics.median(x[k] for x in res["off"])
        on = statistics.median(x[k] for x in res["on"])
        print(f"{k:18s} {off:10.3f} {on:10.3f} {on / off if off else float('nan'):8.3f}")


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
    ap.add_argument("--overlap", action="store_true", help="measure overlap scheduling only")
    ap.add_argument("--fused", action="store_true", help="measure fused steps only")
    ap.add_argument("--prompts", type=int, default=6, help="--fused: prompts prefilled")
    ap.add_argument("--prompt-len", type=int, default=192, help="--fused: tokens per prompt")
    ap.add_argument("--chunk", type=int, default=64, help="--fused: prefill chunk tokens")
    ap.add_argument("--model", default="default", choices=("default", "tiny"))
    ap.add_argument("--rows", type=int, default=None, help="running rows (64; --fused: 8)")
    ap.add_argument("--queue", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.fused:
        args.rows = 8 if args.rows is None else args.rows
        measure_fused(args)
        return
    args.rows = 64 if args.rows is None else args.rows
    if args.overlap:
        measure_overlap(args)
        return
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
