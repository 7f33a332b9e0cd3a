"""Joining JAX's multi-process runtime (``EngineConfig.distributed``)."""

from __future__ import annotations

import os


def init_distributed() -> None:
    """Join JAX's multi-process runtime once.

    The coordinator comes from ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself); the process
    count and this process's rank from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, read here
    because JAX auto-detects them only on managed clusters (Cloud TPU, SLURM, Open MPI).
    """
    import jax

    # Not jax.process_count(): asking it starts JAX's backends, after which initialize() fails.
    if jax.distributed.is_initialized():
        return
    num, rank = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        num_processes=int(num) if num else None, process_id=int(rank) if rank else None
    )
