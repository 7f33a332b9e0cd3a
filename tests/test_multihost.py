"""Multi-controller serving (issue 18): two local processes joined by ``jax.distributed``, one
simulated CPU device each, one TP=2 model over both devices. Process 0 schedules and generates;
process 1 only replays its device calls (tokencake/multihost.py). Independent reference: greedy
tokens of one process holding both devices (TP=2) with no host tier and no memory pressure.

The processes are started the way the README's deployment notes say (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), on a free port of 127.0.0.1; the work of each is in
tests/helpers/multihost_run.py. The fast tests below need no second process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tokencake import multihost
from tokencake.async_engine import AsyncEngine
from tokencake.errors import EngineDeadError
from tokencake.sampling_params import SamplingParams

SCRIPT = Path(__file__).parent / "helpers" / "multihost_run.py"
TIMEOUT_S = 280  # per run; a hang fails the test instead of the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
    env.update(extra)
    return env


def _last_json(out: str) -> dict:
    """The helper's JSON line (gloo prints its own lines on stdout too)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _reference(devices: int = 2, *extra: str) -> list[list[int]]:
    ref = subprocess.run(
        [sys.executable, str(SCRIPT), "single", str(devices), *extra], capture_output=True,
        text=True, timeout=TIMEOUT_S, env=_env(),
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    return _last_json(ref.stdout)["tokens"]


def _two_processes(leader_args: list[str], follower_args: list[str]) -> list[tuple[int, dict]]:
    """Run the helper as rank 0 and rank 1 of one distributed run; (exit code, JSON) of each."""
    return _processes([leader_args, follower_args])


def _processes(args_by_rank: list[list[str]]) -> list[tuple[int, dict]]:
    """Run the helper as ranks 0..N-1 of one distributed run; (exit code, JSON) of each."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "dist", "1", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(len(args_by_rank)),
                JAX_PROCESS_ID=str(rank),
            ),
        )  # fmt: skip
        for rank, extra in enumerate(args_by_rank)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert out.strip(), (
                f"rank {procs.index(p)} printed nothing (exit {p.returncode}):\n{err[-3000:]}"
            )
            results.append((p.returncode, _last_json(out)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow  # three processes compile the tiny model's step shapes on 2 cores: ~2 minutes
def test_two_processes_match_one_with_host_tier_round_trip():
    """Greedy tokens of the 2-process run equal one process's at the same TP, with swap
    preemption through the host tier; an explicit offload -> upload is bit-exact on each
    process's own KV shard; nothing leaks."""
    expected = _reference()
    (rc0, leader), (rc1, follower) = _two_processes(["--host-tier"], ["--host-tier"])
    assert rc0 == 0 and rc1 == 0, (leader, follower)
    assert leader["rank"] == 0 and leader["processes"] == 2 and follower["rank"] == 1
    assert "'tp': 2" in leader["kv_sharding"]
    assert leader["tokens"] == expected and leader["errors"] == []
    assert leader["swap_outs"] > 0 and leader["leaked"] == 0  # KV copies ran on both processes
    assert follower["followed"] > 0
    for r in (leader, follower):
        rt = r["round_trip"]
        assert rt["pages"] == 2
        assert rt["device_before"] == rt["host"] == rt["device_after"], r["rank"]
        assert rt["target_before"] != rt["device_after"]  # the upload changed the target pages
    # each process checked its own shard (other KV heads), not one copy of the same bytes
    assert leader["round_trip"]["host"] != follower["round_trip"]["host"]


@pytest.mark.slow  # four processes load SmolLM2-135M and compile it at TP = 3: minutes
def test_three_processes_match_one_on_the_default_model():
    """The default model (3 KV heads, so TP = 3): three processes of one device each give the
    greedy tokens of one process holding three devices."""
    expected = _reference(3, "--model", "default")
    results = _processes([["--model", "default"]] * 3)
    assert [rc for rc, _ in results] == [0, 0, 0], results
    leader = results[0][1]
    assert leader["processes"] == 3 and "'tp': 3" in leader["kv_sharding"]
    assert leader["tokens"] == expected and leader["errors"] == []
    assert all(r["followed"] > 0 for _, r in results[1:])


@pytest.mark.slow  # two processes compile a few step shapes: about a minute
def test_dead_follower_fails_requests_and_stops_the_leader():
    """A follower that dies mid-generation: the leader fails every request in flight with a
    clear error, refuses new ones and exits on its own, well before JAX's heartbeat timeout."""
    t0 = time.monotonic()
    # Warmed up, as `tokencake serve` is: without it, a process waiting for its peer to compile
    # a new shape learns of the death only at JAX's heartbeat timeout (multihost.py).
    (rc0, leader), (rc1, follower) = _two_processes(["--warmup"], ["--warmup", "--die-after", "3"])
    assert rc1 == 3 and follower["died_after"] == 3
    assert rc0 == 1  # multihost.exit_now after reporting, not JAX's abort (134)
    assert leader["errors"] == [
        "a process of the distributed run failed (a device call across processes raised "
        "JaxRuntimeError); the engine stopped"
    ]
    assert leader["refused"].startswith("ProcessGroupFailed: a process of the distributed run")
    assert all(len(t) < 12 for t in leader["tokens"])  # none finished
    assert time.monotonic() - t0 < TIMEOUT_S


# ---- fast: no second process ------------------------------------------------------------------
def test_plan_message_round_trip_and_size_check():
    arrays = [np.arange(6, dtype=np.int32).reshape(2, 3), np.linspace(0, 1, 4, dtype=np.float32)]
    msg = multihost.pack((multihost.OP_STEP, 2, 3, 4), arrays)
    header, out = multihost.unpack(msg, [np.zeros_like(a) for a in arrays])
    assert header[:4] == [multihost.OP_STEP, 2, 3, 4]
    for a, b in zip(arrays, out, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    with pytest.raises(RuntimeError, match="does not match"):
        multihost.unpack(msg + b"\0", [np.zeros_like(a) for a in arrays])


def test_coordination_client_needs_jax_distributed():
    with pytest.raises(RuntimeError, match="jax.distributed is not initialized"):
        multihost.coordination_client()


class _Group:  # stands in for the PlanChannel of a distributed run
    leader = False


def _broken(*_):
    raise RuntimeError("Gloo all-reduce failed: Connection closed by peer")


def test_process_group_failure_stops_the_engine(make_engine):
    """What the leader does when a cross-process device call raises (simulated in one
    process): every request in flight fails with ProcessGroupFailed, then add_request and
    step raise it."""
    eng = make_engine(overlap=False)  # as a distributed engine runs (no overlap there)
    eng.channel = _Group()
    eng.loop.execute = _broken
    params = SamplingParams(max_tokens=8)
    ids = [eng.add_request("hello there", params, request_id=f"r{i}") for i in range(3)]
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ids
    assert all(isinstance(o.error, multihost.ProcessGroupFailed) and o.finished for o in outs)
    assert "RuntimeError" in str(outs[0].error) and not eng.has_unfinished_requests()
    with pytest.raises(multihost.ProcessGroupFailed):
        eng.add_request("one more", params)
    with pytest.raises(multihost.ProcessGroupFailed):
        eng.step()


def test_async_engine_stops_serving_after_a_process_group_failure(make_engine):
    """The server's engine thread: the request gets EngineDeadError (HTTP 503) with the reason,
    and the engine is no longer alive (``tokencake serve --distributed`` then exits)."""
    eng = make_engine(overlap=False)  # as a distributed engine runs (no overlap there)
    eng.channel = _Group()
    eng.loop.execute = _broken
    ae = AsyncEngine(eng)
    try:
        with pytest.raises(EngineDeadError, match="a process of the distributed run failed"):
            asyncio.run(ae.generate("hello there", SamplingParams(max_tokens=8)))
        ae._thread.join(10)
        assert not ae.alive and isinstance(ae.error, multihost.ProcessGroupFailed)
    finally:
        ae.shutdown()
