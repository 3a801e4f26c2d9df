r"""``python -m astrollama_jax aot``: compile a config's real train step ahead of time.

  python -m astrollama_jax aot --config=configs/llama2_cpt.py:70b --topology=v5p-128 \
      [--config.mesh='(1,32,2)' --config.train.grad_accum_steps=10 ...]
  python -m astrollama_jax aot --config=configs/llama2_cpt.py:70b --devices=64

``--topology`` (``v5p-128``, ``v4-256``, ``v5e-8``, ``v6e-16``, ``2xv5p-128`` for two slices)
compiles with libtpu's own compiler for that slice (``tpu_plan.py``; no TPU needed): the
per-chip plan the slice would run, against the chip's HBM, with the fused attention kernels
compiled in. Without libtpu, ``--devices=N`` plans on N fake CPU devices instead.

The config and its ``--config.*`` overrides are read exactly as ``train`` reads them, and the
step is the trainer's own (``train.program.compile_train_step``). Nothing is allocated: the train
state and the batch are abstract shapes carrying the shardings the run would use, the step is
lowered and compiled for N fake CPU devices laid out as the config's mesh, and the per-device
memory XLA plans (arguments, outputs, temporaries; donated outputs alias their inputs) is
printed next to an analytic count of the state. The CPU compiler stands in for the
accelerator's: same sharding and same program, but its fusion and buffer assignment differ (see
docs/benchmarks.md, "Scale").
"""

from __future__ import annotations

from typing import Any

from absl import flags

from astrollama_jax.errors import UserError
from astrollama_jax.util import tables

GB = 1e9


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


def plan(config: Any, devices: int) -> dict[str, Any]:
  """Compile the train step of ``config`` for ``devices`` CPU devices; return the memory plan.

  Must run before anything initialises the JAX backend (it sets the CPU device count).
  """
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  if jax.device_count() != devices:
    raise RuntimeError(f"JAX already has {jax.device_count()} devices; run aot in a fresh process")
  return memory_plan(config)


def memory_plan(config: Any) -> dict[str, Any]:
  """The per-device memory plan of ``config``'s train step on this process's devices."""
  import jax

  from astrollama_jax import sharding
  from astrollama_jax.train import program as program_lib
  from astrollama_jax.train import resolve

  devices = jax.device_count()
  cfg = resolve.preset_model_config(config)
  attention = cfg.attention_impl
  if attention != "xla":  # fused kernels are GPU/TPU programs: the CPU stand-in plans XLA's
    cfg = cfg.replace(attention_impl="xla")
  mesh = sharding.make_mesh(tuple(config.mesh))
  resolve.check_batch_layout(config, dict(mesh.shape))
  # The schedule's length changes constants only, not a buffer: the run's, else a stand-in.
  program = program_lib.compile_train_step(
    config, mesh, cfg=cfg, total_steps=config.train.num_steps or 1000
  )
  mem = program.compiled.memory_analysis()
  t = config.train
  gbs, seq = t.global_batch_size, config.data.seq_len
  moments = config.optimizer.moments_dtype
  n_params = cfg.num_params()
  moment_bytes = 2 if moments == "bfloat16" else 4
  trained = sum(x.size for x in jax.tree.leaves(program.state_shapes.params))
  # The base rides along frozen (LoRA): its bytes, no moments.
  frozen_bytes = sum(
    x.size * x.dtype.itemsize for x in jax.tree.leaves(program.state_shapes.frozen)
  )
  per_device = {
    "arguments_gb": mem.argument_size_in_bytes / GB,
    "outputs_gb": mem.output_size_in_bytes / GB,
    "aliased_gb": mem.alias_size_in_bytes / GB,
    "temp_gb": mem.temp_size_in_bytes / GB,
    "code_gb": mem.generated_code_size_in_bytes / GB,
  }
  per_device["total_gb"] = (
    per_device["arguments_gb"]
    + per_device["outputs_gb"]
    - per_device["aliased_gb"]
    + per_device["temp_gb"]
  )
  return {
    "model": config.model.preset,
    "params_b": n_params / 1e9,
    "devices": devices,
    "mesh": dict(mesh.shape),
    "global_batch": gbs,
    "seq_len": seq,
    "micro_batch": gbs // t.grad_accum_steps,
    "grad_accum": t.grad_accum_steps,
    "remat": cfg.remat_policy,
    "attention": cfg.attention_impl + (f" (config: {attention})" if attention != "xla" else ""),
    "compute_dtype": cfg.compute_dtype,
    "moments_dtype": moments,
    "loss_chunk": config.loss.chunk_size,
    "lora": program.lora.to_dict() if program.lora else None,
    "base_dtype": program.base_dtype,
    "trained_params": trained,
    # What the state alone must take if evenly sharded: f32 master weights (of the trained
    # params: all, or the adapters) + two moments, + a LoRA run's frozen base.
    "state_gb_analytic": (trained * (4 + 2 * moment_bytes) + frozen_bytes) / devices / GB,
    **{k: round(v, 3) for k, v in per_device.items()},
    "compile_s": round(program.compile_s, 1),
  }


def tpu_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
  """The table of a libtpu plan (``tpu_plan.train_step_plan``)."""
  gib = lambda key: f"{result[key] / 2**30:.2f}" if key in result else "-"  # noqa: E731
  return [
    ("target / mesh", f"{result['target']} ({result['chips']} chips) / {result['mesh']}"),
    (
      "batch",
      f"{result['global_batch']} x {result['seq_len']} (accumulation {result['grad_accum']})",
    ),
    ("remat / attention", f"{result['remat']} / {result['attention']}"),
    ("arguments (GiB/chip)", gib("argument_bytes")),
    ("temporaries (GiB/chip)", gib("temp_bytes")),
    ("peak (GiB/chip)", gib("peak_bytes")),
    ("HBM (GiB/chip)", gib("hbm_bytes")),
    ("fits", str(result["fits"])),
    ("fused-kernel calls", str(result.get("kernel_calls", "-"))),
    ("compile (s)", str(result["compile_s"])),
  ]


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
    tables.report(
      f"aot: libtpu's per-chip plan of the train step on {result['target']}",
      result,
      rows=tpu_rows(result),
      columns=("quantity", "value"),
    )
    return
  result = plan(FLAGS.config, FLAGS.devices)
  result["fits"] = result["total_gb"] <= FLAGS.device_gb
  result.update(
    target=f"cpu-{FLAGS.devices}",
    peak_gib=round(result["total_gb"] * 1e9 / 2**30, 3),
    hbm_gib=round(FLAGS.device_gb * 1e9 / 2**30, 3),
    kernel_calls=0,
  )
  rows = [
    ("model", f"{result['model']} ({result['params_b']:.2f}B params)"),
    ("devices / mesh", f"{result['devices']} / {result['mesh']}"),
    (
      "batch",
      f"{result['global_batch']} x {result['seq_len']} (micro-batch "
      f"{result['micro_batch']}, accumulation {result['grad_accum']})",
    ),
    (
      "trained params",
      f"{result['trained_params']:,}"
      + (
        f" (LoRA rank {result['lora']['rank']}, base {result['base_dtype']})"
        if result["lora"]
        else ""
      ),
    ),
    ("remat / attention", f"{result['remat']} / {result['attention']}"),
    ("compute / moments dtype", f"{result['compute_dtype']} / {result['moments_dtype']}"),
    ("state, analytic (GB/device)", f"{result['state_gb_analytic']:.2f}"),
    ("arguments (GB/device)", f"{result['arguments_gb']:.2f}"),
    ("temporaries (GB/device)", f"{result['temp_gb']:.2f}"),
    ("outputs - aliased (GB/device)", f"{result['outputs_gb'] - result['aliased_gb']:.2f}"),
    ("total (GB/device)", f"{result['total_gb']:.2f}"),
    (f"fits {FLAGS.device_gb:g} GB", str(result["fits"])),
    ("compile (s)", f"{result['compile_s']}"),
  ]
  tables.report(
    "aot: per-device memory plan of the train step",
    result,
    rows=rows,
    columns=("quantity", "value"),
  )
