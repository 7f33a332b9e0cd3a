"""Run greedy generation on N simulated CPU devices at each tensor_parallel_size asked for
(``tp_check.py N tiny|default [1,2,4] [weight_dtype]``, sizes default ``1,N``) and print the
token lists as JSON, by size. Invoked in a subprocess by tests/test_tensor_parallel.py because
the device count must be fixed before JAX starts; one process runs several sizes so they share
the 1-device reference."""

from __future__ import annotations

import json
import os
import sys

n = int(sys.argv[1])
which = sys.argv[2]  # "tiny" or "default"
sizes = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, n]
weight_dtype = sys.argv[4] if len(sys.argv) > 4 else None
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from conftest import TINY_ENGINE, lively_params  # noqa: E402

from tokencake.config import EngineConfig  # noqa: E402
from tokencake.engine import LLMEngine  # noqa: E402
from tokencake.llm import LLM  # noqa: E402
from tokencake.models.config import tiny_config  # noqa: E402
from tokencake.models.tokenizer import Tokenizer  # noqa: E402
from tokencake.sampling_params import SamplingParams  # noqa: E402

if which == "tiny":
    cfg = tiny_config(num_heads=8, num_kv_heads=4)
    params, tok, name = lively_params(cfg), Tokenizer.byte_level_for_tests(), "tiny"
    prompts = ["the quick brown fox", "tensor parallel " * 4, "x"]
    options = dict(TINY_ENGINE)
else:
    from tokencake.models.hub import resolve_model

    cfg, params, tok, name = resolve_model(None)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}])
        for q in ("What is the capital of France?", "Name a color.")
    ]
    options = dict(TINY_ENGINE, num_pages=64, max_model_len=256)

results = {}
for tp in sizes:
    try:
        engine = LLMEngine(
            EngineConfig(**options, tensor_parallel_size=tp, weight_dtype=weight_dtype),
            model_config=cfg,
            params=params,
            tokenizer=tok,
            model_name=name,
        )
    except ValueError as exc:
        results[tp] = {"error": str(exc)}
        continue
    outs = LLM.from_engine(engine).generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    engine.pool.check_integrity()
    results[tp] = {
        "tokens": [o.token_ids for o in outs],
        "k_sharding": str(engine.runner.k.sharding),
        "weight_dtype": str(engine.runner.model(engine.runner.state).weight_dtype),
    }
print(json.dumps(results))
