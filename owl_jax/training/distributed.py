"""Multi-process start-up through JAX's own distributed runtime.

`maybe_initialize()` calls `jax.distributed.initialize()` when the environment describes a multi-process
run, and does nothing for a single process:
- explicit: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (e.g. several processes on one
  machine, or a hand-written cluster launch);
- auto-detected by JAX: Cloud TPU pod slices (every worker runs the same command), SLURM, Open MPI.
"""

from __future__ import annotations

import os

import jax

_CLUSTER_HINTS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize() -> bool:
    """Initialise the distributed runtime if this is a multi-process run; returns whether it did."""
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        return True
    workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if any(os.environ.get(k) for k in _CLUSTER_HINTS if k != "TPU_WORKER_HOSTNAMES") or "," in workers:
        jax.distributed.initialize()
        return True
    return False
