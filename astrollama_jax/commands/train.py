r"""``python -m astrollama_jax train``: continual pre-training or SFT, resumable, any mesh.

  python -m astrollama_jax train --config=configs/demo.py --workdir=runs/demo \
      --config.data.lm.path=CORPUS --config.data.tokenizer_path=tokenizer.model \
      [--config.train.num_steps=100 ...]

A config file may take an argument (``--config=configs/llama2_cpt.py:70b``); every key of
``train/defaults.py`` can be overridden with ``--config.SECTION.KEY=VALUE``.

Multi-host: on TPU pods run the same command on every worker with ``--distributed=on``; under
SLURM (srun) or OpenMPI (mpirun) the processes find each other; elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. See ``launch/``.
Re-running the same command resumes from the latest complete checkpoint in ``--workdir``.
"""

from __future__ import annotations

import signal
import sys

from absl import flags, logging
from ml_collections import config_flags

from astrollama_jax.util import checks, tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file (ml_collections get_config).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed.initialize: auto = when the flags below or SLURM/OpenMPI/TPU-pod "
    "variables say there are several processes.",
  )
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (plain multi-host GPU).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  from astrollama_jax.commands import cli

  cli.no_extra_args(argv)
  from astrollama_jax.train import exit_codes, preemption

  try:  # a preemption while starting up (restore, compile) must still be requeued
    with preemption.stop_at_once():
      summary = _train()
  except preemption.Preempted:
    logging.warning("SIGTERM while starting up: stopping at once (nothing new to save)")
    sys.exit(exit_codes.PREEMPTED)
  if summary is None:
    sys.exit(exit_codes.NONFINITE)
  import jax

  if jax.process_index() == 0:
    tables.report(f"train: {FLAGS.workdir}", summary)
  sys.exit(exit_codes.for_summary(summary))


def _train() -> dict | None:
  """The run the flags name; None after too many non-finite steps (logged)."""
  from astrollama_jax.train import distributed
  from astrollama_jax.train.metrics import quiet_library_logs

  quiet_library_logs()
  if distributed.will_initialize(FLAGS.distributed, FLAGS.coordinator_address):
    # JAX's preemption service takes SIGTERM from here on (its sync point saves at a step); a
    # Python handler left in place would shadow it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  distributed.initialize(
    FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  import psutil

  from astrollama_jax.train import loop
  from astrollama_jax.util import diskspace

  checks.check_output_dir(FLAGS.workdir, empty=False, flag="--workdir")
  try:
    with diskspace.disk_full_errors(
      FLAGS.workdir, "the run's files under"
    ):  # checkpoints name their step
      from astrollama_jax.train import watchdog, workdir_lock

      with workdir_lock.held(FLAGS.workdir), watchdog.watching(FLAGS.config.train.hang_timeout_s):
        # the process's start: interpreter and import time are the run's start-up too
        started = psutil.Process().create_time()
        return loop.train(FLAGS.config, FLAGS.workdir, started=started)
  except loop.NonFiniteError as e:
    logging.error("%s", e)
    return None
