r"""``python -m astrollama_jax.train``: continual pre-training or SFT, resumable, any mesh.

  python -m astrollama_jax.train --config=configs/demo.py --workdir=/tmp/demo_run \
      [--config.train.num_steps=100 ...]

Multi-host: on TPU pods run the same command on every worker with ``--distributed=on``; under
SLURM (srun) or OpenMPI (mpirun) the processes find each other; elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. See ``launch/``.
Re-running the same command resumes from the latest complete checkpoint in ``--workdir``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py file (ml_collections get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize: auto = when the flags below or SLURM/OpenMPI/TPU-pod "
                  "variables say there are several processes.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (plain multi-host GPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def table(summary: dict) -> str:
  rows = []
  for k, v in summary.items():
    if isinstance(v, dict):
      v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
    elif isinstance(v, float):
      v = f"{v:.4g}"
    rows.append((k, str(v)))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from astrollama_jax.train import distributed
  from astrollama_jax.train.metrics import quiet_library_logs
  quiet_library_logs()
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  import jax
  from astrollama_jax import diskspace
  from astrollama_jax.train import loop
  config = FLAGS.config
  try:
    with diskspace.disk_full_errors(FLAGS.workdir, "the run's files under"):  # checkpoints name their step
      # --- run-survival hooks: one trainer per workdir; the hang watchdog ---
      from astrollama_jax.train import watchdog, workdir_lock
      with workdir_lock.held(FLAGS.workdir), watchdog.watching(config.train.hang_timeout_s):
        summary = loop.train(config, FLAGS.workdir)
  except loop.NonFiniteError as e:
    logging.error("%s", e)
    sys.exit(3)
  except diskspace.DiskFullError as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print("\n" + table(summary))
    print(json.dumps(summary))
  from astrollama_jax.train import exit_codes  # run-survival hook: 75 = preempted after saving
  sys.exit(exit_codes.for_summary(summary))


if __name__ == "__main__":
  app.run(main)
