"""Multi-controller serving (issue 18): two local processes joined by ``jax.distributed``, each
with 2 simulated CPU devices, one TP=4 model over all four. Process 0 schedules and generates;
process 1 only replays its device calls (tokencake/multihost.py). Independent reference: greedy
tokens of one process at TP=1 with no host tier and no memory pressure.

The processes are started the way the README's deployment notes say (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), on a free port of 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "helpers" / "multihost_run.py"
TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
    env.update(extra)
    return env


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # two processes compile a TP=4 model on 2 cores: minutes
def test_two_processes_match_one():
    ref = subprocess.run(
        [sys.executable, str(SCRIPT), "single"], capture_output=True, text=True,
        timeout=TIMEOUT_S, env=_env(),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "dist"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank),
            ),
        )
        for rank in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
            outs.append(_last_json(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    leader, follower = outs
    assert leader["rank"] == 0 and leader["processes"] == 2 and follower["rank"] == 1
    assert "'tp': 4" in leader["kv_sharding"]
    assert leader["tokens"] == _last_json(ref.stdout)["tokens"]
    assert leader["swap_outs"] > 0 and leader["leaked"] == 0  # KV copies ran on both processes
    assert follower["followed"] > 0
