"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the cluster environment.

On TPU pods, SLURM (``srun``) and OpenMPI (``mpirun``) JAX finds the coordinator, the process
count and this process's id by itself; plain multi-host GPU jobs pass them as flags. It must run
before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def cluster_env() -> str | None:
  """The name of a detected multi-process launcher, or None for a single process."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu-pod"
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  """``mode``: 'on' always initialises, 'off' never, 'auto' when flags or a cluster say so."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r} is not auto, on or off")
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if mode == "off" or (mode == "auto" and not explicit and cluster_env() is None):
    return
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()  # TPU pod / SLURM / OpenMPI auto-detection
  logging.info("process %d of %d (%s); %d local of %d devices", jax.process_index(),
               jax.process_count(), cluster_env() or "flags", jax.local_device_count(),
               jax.device_count())
