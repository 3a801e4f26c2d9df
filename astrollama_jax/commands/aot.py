r"""``python -m astrollama_jax aot``: compile a config's real train step ahead of time.

  python -m astrollama_jax aot --config=configs/llama2_cpt.py:70b --topology=v5p-128 \
      [--config.mesh='(1,32,2)' --config.train.grad_accum_steps=10 ...]
  python -m astrollama_jax aot --config=configs/llama2_cpt.py:70b --devices=64

``--topology`` (``v5p-128``, ``v4-256``, ``v5e-8``, ``v6e-16``, ``2xv5p-128`` for two slices)
compiles with libtpu's own compiler for that slice (``perf.tpu_plan``; no TPU needed): the
per-chip plan the slice would run, against the chip's HBM, with the fused attention kernels
compiled in. Without libtpu, ``--devices=N`` plans on N fake CPU devices instead
(``perf.cpu_plan``): same sharding and same program, but the CPU compiler's fusion and buffer
assignment (see docs/benchmarks.md, "Scale").

The config and its ``--config.*`` overrides are read exactly as ``train`` reads them, and the
step is the trainer's own (``train.program.compile_train_step``). Nothing is allocated.
"""

from __future__ import annotations

from absl import flags

from astrollama_jax.errors import UserError
from astrollama_jax.util import tables


def define_flags() -> None:
  """The command's flags (defined when the command runs, so importing this module defines none)."""
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config",
    None,
    "A configs/*.py training config; --config.* overrides as for train.",
    lock_config=True,
  )
  flags.DEFINE_string(
    "topology",
    None,
    "TPU slice to compile for with libtpu, e.g. v5p-128, v4-256, v5e-8, v6e-16, 2xv5p-128.",
  )
  flags.DEFINE_integer("devices", None, "Without --topology: number of fake CPU devices.")
  flags.DEFINE_float("device_gb", 80.0, "With --devices: per-device memory to compare against, GB.")
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  from astrollama_jax.commands import cli

  cli.no_extra_args(argv)
  FLAGS = flags.FLAGS
  if bool(FLAGS.topology) == bool(FLAGS.devices):
    raise UserError("give --topology=SLICE (libtpu) or --devices=N (fake CPU devices)")
  if FLAGS.topology:
    from astrollama_jax.perf import tpu_plan

    topology = tpu_plan.parse_topology(FLAGS.topology)
    if not tpu_plan.libtpu_available():
      raise UserError(
        "--topology needs libtpu (pip install 'libtpu==0.0.42.*'); "
        "--devices=N plans on fake CPU devices without it"
      )
    result = tpu_plan.train_step_plan(FLAGS.config, topology)
    peak = result.get("peak_bytes", result.get("temp_bytes", 0))
    result.update(peak_gib=round(peak / 2**30, 3), hbm_gib=round(result["hbm_bytes"] / 2**30, 3))
    title = f"aot: libtpu's per-chip plan of the train step on {result['target']}"
    rows = tpu_plan.rows(result)
  else:
    from astrollama_jax.perf import cpu_plan

    result = cpu_plan.plan(FLAGS.config, FLAGS.devices, FLAGS.device_gb)
    title, rows = "aot: per-device memory plan of the train step", cpu_plan.rows(result)
  tables.report(title, result, rows=rows, columns=("quantity", "value"))
