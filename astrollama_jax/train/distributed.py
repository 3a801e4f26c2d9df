"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the cluster environment.

On TPU pods, SLURM (``srun``) and OpenMPI (``mpirun``) JAX finds the coordinator, the process
count and this process's id by itself; plain multi-host GPU jobs pass them as flags. It must run
before anything touches a JAX backend.

Under Slurm the GPUs each process drives come from ``slurm_local_device_ids``: JAX's own Slurm
detection gives task ``SLURM_LOCALID`` the single GPU of that number, which is right for one task
per GPU but leaves 7 of 8 GPUs idle with one task per node (``launch/slurm_gpu.sbatch``).

A process that dies (``kill -9``, a lost node) stops sending heartbeats; after
``HEARTBEAT_TIMEOUT_S`` the coordination service ends the others with an error instead of
letting them wait in a collective forever (the hang watchdog, ``train.hang_timeout_s``, may
catch it sooner).
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re

from absl import logging
import jax


def cluster_env() -> str | None:
  """The name of a detected multi-process launcher, or None for a single process."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu-pod"
  return None


HEARTBEAT_TIMEOUT_S = int(os.environ.get("ASTROLLAMA_HEARTBEAT_TIMEOUT_S", "100"))


def _tasks_on_node(env: Mapping[str, str]) -> int:
  """This node's task count from Slurm's compressed per-node list, e.g. ``2(x3),1``."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if not spec:
    return int(env.get("SLURM_NTASKS_PER_NODE", "1"))
  counts: list[int] = []
  for part in spec.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not m:
      raise ValueError(f"cannot read Slurm's tasks per node {spec!r}")
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  node = int(env.get("SLURM_NODEID", "0"))
  return counts[node] if node < len(counts) else counts[-1]


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """The GPUs this Slurm task drives, as indices into the GPUs CUDA shows it; None: JAX decides.

  The GPUs a task sees are ``CUDA_VISIBLE_DEVICES`` as Slurm set it. If Slurm already bound GPUs
  to tasks (``--gpus-per-task``, ``--gpu-bind``: the task sees fewer than the node's
  ``SLURM_GPUS_ON_NODE``), the task drives all it sees. If every task sees all of the node's GPUs,
  they are split evenly among the node's tasks in ``SLURM_LOCALID`` order: one task per node
  drives all of them, one task per GPU drives one each. None when no GPUs are allocated (a CPU
  run), outside Slurm, or when ``JAX_LOCAL_DEVICE_IDS`` chooses explicitly.
  """
  if "SLURM_JOB_ID" not in env or env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    seen = len([d for d in visible.split(",") if d.strip()])
  else:
    seen = int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
  if seen == 0:
    return None
  on_node = int(env.get("SLURM_GPUS_ON_NODE", seen) or seen)
  tasks = _tasks_on_node(env)
  if tasks <= 1 or seen < on_node or "SLURM_GPUS_PER_TASK" in env:
    return list(range(seen))
  if seen % tasks:
    raise ValueError(
      f"{seen} GPUs on this node cannot be split evenly over its {tasks} Slurm "
      "tasks; use one task per node or per GPU"
    )
  share, local = seen // tasks, int(env.get("SLURM_LOCALID", "0"))
  return list(range(local * share, (local + 1) * share))


def will_initialize(mode: str = "auto", coordinator_address: str | None = None) -> bool:
  """Whether ``initialize`` with these arguments starts ``jax.distributed``."""
  return mode == "on" or (
    mode == "auto" and (coordinator_address is not None or cluster_env() is not None)
  )


def initialize(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """``mode``: 'on' always initialises, 'off' never, 'auto' when flags or a cluster say so."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r} is not auto, on or off")
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if not will_initialize(mode, coordinator_address):
    return
  options = {"heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S}
  if cluster_env() == "slurm" and not explicit:
    options["local_device_ids"] = slurm_local_device_ids(os.environ)
  if explicit:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      **options,
    )
  else:
    jax.distributed.initialize(**options)  # TPU pod / SLURM / OpenMPI auto-detection
  logging.info(
    "process %d of %d (%s); %d local of %d devices",
    jax.process_index(),
    jax.process_count(),
    cluster_env() or "flags",
    jax.local_device_count(),
    jax.device_count(),
  )


def on_every_process(flag: bool) -> bool:
  """True only if ``flag`` is true on every process of the job (all of them must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  import numpy as np

  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
