"""Multi-controller serving on ``jax.distributed``: process 0 decides, every process executes.

JAX is multi-controller across hosts: every process must launch the same jitted programs, in the
same order, with the same inputs, or their collectives never meet. Only process 0 (the
*leader*) runs the server, the scheduler and every policy; the other processes (*followers*)
never schedule. Before the leader launches a device call that spans the mesh (a step group, a
KV page copy) it broadcasts that call's host inputs; each follower receives them and launches
the same compiled executable on its own devices. Deterministic by construction: followers only
replay. Sampled tokens are replicated, so the leader reads them from its own shards.

The wire is JAX's own coordination service (the key-value store ``jax.distributed`` runs on
process 0): one message per device call, a fixed ``int32`` header (what to run, its shape
bucket) followed by every input array's bytes, under a key per follower and sequence number;
the follower deletes it once read. Not a collective on purpose: a follower waits for the next
call for as long as the server is idle, and XLA:CPU's gloo collectives give up after 30 s.
Followers launch each call as soon as it is announced, so the call's own collectives meet.
A shape compiled on first use (no warm-up) is first awaited by every process at a
coordination-service barrier, so no process enters the call's collectives while another is still
compiling it.

Failure: when a process dies, the next device call that spans it raises (on CPU, gloo reports
the closed connection at once; elsewhere JAX's coordination service declares the process dead
after its heartbeat timeout, 100 s by default, and ends the others). The leader's engine then
fails every request in flight with :class:`ProcessGroupFailed` and accepts no more
(``LLMEngine.failure``); ``tokencake serve`` stops and exits with :func:`exit_now`. A follower
whose leader is gone stops when its next read of the coordination service fails. Not noticed
fast: a process that dies while the others wait at a barrier (a first-use compile without
warm-up) or while the server is idle; JAX's heartbeat timeout then aborts the others.

Tested on one machine with simulated CPU devices only (tests/test_multihost.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from tokencake.scheduler.faults import StepFailed

if TYPE_CHECKING:
    from tokencake.memory.transfer import TransferEngine
    from tokencake.runner import ModelRunner

log = logging.getLogger(__name__)

OP_STOP, OP_STEP, OP_COPY = 0, 1, 2
DIRECTIONS = ("d2h", "h2d")
HEADER_LEN = 8
PREFIX = "tokencake/plan"
POLL_MS = 1000  # a follower's wait per attempt; it waits as long as the leader is idle


def pack(header: Sequence[int], arrays: Sequence[np.ndarray]) -> bytes:
    """One message: the ``int32`` header, padded to ``HEADER_LEN``, then the arrays' bytes."""
    head = np.zeros((HEADER_LEN,), np.int32)
    head[: len(header)] = header
    return head.tobytes() + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)


def unpack(msg: bytes, templates: Sequence[np.ndarray]) -> tuple[list[int], list[np.ndarray]]:
    """``pack``'s header and arrays shaped and typed like ``templates``."""
    at = HEADER_LEN * 4
    header = np.frombuffer(msg[:at], np.int32).tolist()
    out = []
    for t in templates:
        out.append(np.frombuffer(msg[at : at + t.nbytes], t.dtype).reshape(t.shape).copy())
        at += t.nbytes
    if at != len(msg):
        raise RuntimeError(f"a plan message of {len(msg)} bytes does not match its header")
    return header, out


class ProcessGroupFailed(StepFailed):
    """A device call across the processes of a distributed run failed, most likely because a
    process died or lost contact. Every process's KV must stay identical, so the whole run is
    over: the leader fails every request in flight with this error and accepts no more."""


def coordination_client():
    """The client of JAX's coordination service (the key-value store ``jax.distributed`` runs
    on process 0). JAX has no public handle to it (``jax.experimental.multihost_utils`` reaches
    it the same way), so this is the one place that reads the private one; if a JAX release
    moves it, this raises naming what is missing rather than failing somewhere later."""
    try:
        from jax._src import distributed
    except ImportError as exc:  # pragma: no cover - depends on the JAX release
        raise RuntimeError(f"this JAX has no jax._src.distributed ({exc})") from None
    client = getattr(getattr(distributed, "global_state", None), "client", None)
    if client is None:
        raise RuntimeError(
            "jax.distributed is not initialized (or this JAX release keeps its coordination "
            "client elsewhere than jax._src.distributed.global_state.client)"
        )
    for method in ("key_value_set_bytes", "blocking_key_value_get_bytes", "key_value_delete",
                   "wait_at_barrier"):  # fmt: skip
        if not hasattr(client, method):
            raise RuntimeError(f"JAX's coordination client has no {method}(): unsupported JAX")
    return client


class PlanChannel:
    """Both ends of the plan broadcast. ``leader`` is process 0; the others receive."""

    def __init__(self) -> None:
        import jax

        self.client = coordination_client()
        self.rank = jax.process_index()
        self.leader = self.rank == 0
        self.followers = range(1, jax.process_count())
        self.seq = 0

    def _send(self, header: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        msg = pack(header, arrays)
        for r in self.followers:
            self.client.key_value_set_bytes(f"{PREFIX}/{r}/{self.seq}", msg)
        self.seq += 1

    def send_step(self, shape: tuple[int, int, int], arrays: Sequence[np.ndarray]) -> None:
        """Leader: announce one step group of bucket ``shape`` and its host inputs."""
        self._send((OP_STEP, *shape), [np.asarray(a) for a in arrays])

    def send_copy(self, direction: str, ids: np.ndarray, hids: np.ndarray) -> None:
        """Leader: announce one bucketed KV page copy (padded device and host page ids)."""
        self._send((OP_COPY, DIRECTIONS.index(direction), len(ids)), [ids, hids])

    def stop(self) -> None:
        """Leader: tell the followers to return from :func:`follow`."""
        self._send((OP_STOP,), [])

    def barrier(self, name: str, timeout_s: float = 3600.0) -> None:
        """Every process waits here until all arrive (e.g. at the end of warm-up, so no process
        launches a collective while another is still compiling: XLA:CPU's gloo gives up on a
        peer after 30 s)."""
        self.client.wait_at_barrier(f"{PREFIX}/barrier/{name}", int(timeout_s * 1000))

    def receive(self) -> bytes:
        """Follower: the next message, waiting as long as it takes."""
        key = f"{PREFIX}/{self.rank}/{self.seq}"
        while True:
            try:
                msg = self.client.blocking_key_value_get_bytes(key, POLL_MS)
                break
            except Exception as exc:  # the wait timed out: the leader is idle; ask again
                if "DEADLINE_EXCEEDED" not in str(exc):
                    raise
        self.client.key_value_delete(key)
        self.seq += 1
        return msg


def follow(channel: PlanChannel, runner: ModelRunner, transfer: TransferEngine | None) -> int:
    """Follower loop: replay the leader's device calls until it stops; returns how many ran."""
    n = 0
    while True:
        msg = channel.receive()
        op, *args = _header(msg)
        if op == OP_STOP:
            log.info("the leader stopped after %d device calls", n)
            return n
        if op == OP_STEP:
            shape = (args[0], args[1], args[2])
            abstract = runner.abstract_inputs(*shape)
            templates = [np.zeros(a.shape, a.dtype) for group in abstract for a in group]
            runner.run_inputs(shape, unpack(msg, templates)[1])
        elif op == OP_COPY:
            if transfer is None:
                raise RuntimeError("the leader copies KV but this process has no host tier")
            direction, bucket = DIRECTIONS[args[0]], args[1]
            ids, hids = unpack(msg, [np.zeros((bucket,), np.int32)] * 2)[1]
            transfer.run_copy(direction, ids, hids)
        else:
            raise RuntimeError(f"unknown plan op {op} from the leader")
        n += 1


def _header(msg: bytes) -> list[int]:
    return np.frombuffer(msg[: HEADER_LEN * 4], np.int32).tolist()


def attach(runner: ModelRunner, transfer: TransferEngine | None) -> PlanChannel | None:
    """The plan channel of a multi-process run (None in one process). On the leader the runner
    and the transfer engine announce every device call through it before launching it."""
    import jax

    if jax.process_count() == 1:
        return None
    tp = runner.cfg.tensor_parallel_size
    if tp != jax.device_count():
        raise ValueError(
            f"tensor_parallel_size={tp} must span every process's devices "
            f"({jax.device_count()} over {jax.process_count()} processes) in a multi-process run"
        )
    channel = PlanChannel()
    runner.group = channel
    if transfer is not None:
        transfer.group = channel
    if channel.leader:
        runner.channel = channel
        if transfer is not None:
            transfer.channel = channel
    return channel


def exit_now(code: int) -> NoReturn:
    """End this process at once with ``code`` after a distributed run lost a process.

    A normal exit runs JAX's ``jax.distributed.shutdown`` (registered at exit), whose barrier
    the dead process never reaches: it waits, then aborts this process (SIGABRT) with a fatal
    coordination-service error. The failure has already been reported, so skip that."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
