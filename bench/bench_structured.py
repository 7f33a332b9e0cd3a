"""Decode throughput with and without a constrained (or penalized) request in the batch.

One engine, one run: the same batch of plain greedy requests is decoded alone and with one
of its rows replaced by a JSON-schema-constrained request (and, separately, a penalized
one). Passes alternate so machine load hits every variant alike; the median tok/s of each
variant and its ratio to the plain batch are printed.

    python -m bench.bench_structured [--model PATH] [--batch 8] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokencake.config import EngineConfig
from tokencake.engine import LLMEngine
from tokencake.sampling_params import SamplingParams
from tokencake.structured import JsonSchema

# Long by construction (>= 60 array items), so the constrained row stays in the batch for
# the whole measured window instead of stopping early and shrinking the batch.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "minItems": 60,
        }
    },
    "required": ["values"],
    "additionalProperties": False,
}
PROMPT = "List sixty numbers between 0 and 99 as JSON: "


def decode_step_times(engine: LLMEngine, params: list[SamplingParams], steps: int) -> list[float]:
    """Seconds of each of ``steps`` engine steps once every request is decoding (each step
    must produce a token for every request, else the batch shrank and the run is invalid)."""
    ids = [engine.add_request(PROMPT + str(i), p) for i, p in enumerate(params)]
    while any(len(engine.scheduler.requests[i].output_token_ids) == 0 for i in ids):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        n = len(engine.step())
        times.append(time.perf_counter() - t0)
        if n != len(ids):
            raise RuntimeError(f"a step produced {n} tokens for {len(ids)} requests")
    for i in ids:
        engine.abort_request(i)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF / HF folder (default: SmolLM2-135M)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    max_tokens = args.steps + 8
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            max_num_seqs=args.batch,
            max_model_len=256,
            num_pages=256,
            max_prefill_chunk=64,
            max_num_batched_tokens=256,
            warmup=False,
        )  # fmt: skip
    )
    plain = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    variants = {
        "plain": [plain] * args.batch,
        "+1 json_schema": [
            SamplingParams(max_tokens=max_tokens, structured=JsonSchema(LONG_SCHEMA))
        ]
        + [plain] * (args.batch - 1),
        "+1 penalized": [
            SamplingParams(
                max_tokens=max_tokens,
                ignore_eos=True,
                presence_penalty=0.5,
                frequency_penalty=0.5,
                repetition_penalty=1.1,
                logit_bias={13: -5.0},
            )  # fmt: skip
        ]
        + [plain] * (args.batch - 1),
    }
    for params in variants.values():  # compile the shapes and build the grammar tokenizer
        decode_step_times(engine, params, 2)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, params in variants.items():
            times[name] += decode_step_times(engine, params, args.steps)
    b = args.batch
    base_med, base_min = statistics.median(times["plain"]), min(times["plain"])
    print(f"batch {b}, {args.repeats} x {args.steps} decode steps per variant")
    for name, t in times.items():
        med, best = statistics.median(t), min(t)
        print(
            f"{name:>16}: median {b / med:8.1f} tok/s (ratio {base_med / med:.3f})   "
            f"best {b / best:8.1f} tok/s (ratio {base_min / best:.3f})"
        )


if __name__ == "__main__":
    main()
