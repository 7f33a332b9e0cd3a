"""One process of a two-process (multi-controller) run on simulated CPU devices, or the
single-process reference; prints one JSON line. Invoked by tests/test_multihost.py.

``python tests/helpers/multihost_run.py single`` -- TP=1, one process, no host tier, no memory
pressure: the reference tokens.
``python tests/helpers/multihost_run.py dist RANK`` -- one of two processes, each with 2 CPU
devices, joined through ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
(set by the caller, as the README's deployment notes say); TP=4 over both processes' devices,
host tier on, a device pool small enough that requests are swapped out and back. Rank 0 serves
(generates) and prints the tokens; rank 1 follows and prints how many device calls it replayed.
"""

from __future__ import annotations

import json
import os
import sys

role = sys.argv[1]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + (
    "1" if role == "single" else "2"
)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from tests.conftest import TINY_ENGINE, lively_params  # noqa: E402
from tokencake.config import EngineConfig  # noqa: E402
from tokencake.engine import LLMEngine  # noqa: E402
from tokencake.llm import LLM  # noqa: E402
from tokencake.models.config import tiny_config  # noqa: E402
from tokencake.models.tokenizer import Tokenizer  # noqa: E402
from tokencake.sampling_params import SamplingParams  # noqa: E402

CFG = tiny_config(num_heads=8, num_kv_heads=4)
PROMPTS = [
    "multi-agent applications alternate llm calls and tool calls " * 3,
    "0123456789" * 9,
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello world, hello world!",
]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def engine(**over) -> LLMEngine:
    options = {**TINY_ENGINE, **over}
    return LLMEngine(
        EngineConfig(**options),
        model_config=CFG,
        params=lively_params(CFG),
        tokenizer=Tokenizer.byte_level_for_tests(),
    )


if role == "single":
    eng = engine(enable_prefix_cache=False)
    llm = LLM.from_engine(eng)
    print(json.dumps({"tokens": [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]}))
    sys.exit(0)

eng = engine(
    tensor_parallel_size=4, distributed=True, host_kv_gib=0.01, num_pages=14, max_num_seqs=6,
    preemption_mode="swap", warmup=True,
)  # fmt: skip
import jax  # noqa: E402

result = {"rank": jax.process_index(), "processes": jax.process_count()}
if jax.process_index() == 0:
    outs = LLM.from_engine(eng).generate(PROMPTS, GREEDY)
    eng.sync_transfers()
    eng.pool.check_integrity()
    eng.host_pool.check_integrity()
    result.update(
        tokens=[o.token_ids for o in outs],
        swap_outs=eng.scheduler.host_tier.num_swap_outs,
        kv_sharding=str(eng.runner.k.sharding),
        leaked=eng.pool.num_used + eng.host_pool.num_used,
    )
    eng.close()  # releases the followers
else:
    result["followed"] = eng.follow()
    eng.close()
print(json.dumps(result))
