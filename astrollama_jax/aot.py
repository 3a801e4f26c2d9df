r"""``python -m astrollama_jax.aot``: compile a config's real train step for N devices, ahead of time.

  python -m astrollama_jax.aot --config=configs/llama2_70b_cpt.py --devices=64 [--mesh=1,32,2]

Nothing is allocated: the train state and the batch are abstract shapes carrying the shardings
the run would use, the step is lowered and compiled for N fake CPU devices laid out as the
config's mesh, and the per-device memory XLA plans (arguments, outputs, temporaries; donated
outputs alias their inputs) is printed next to an analytic count of the state. The CPU compiler
stands in for the accelerator's: same sharding and same program, but its fusion and buffer
assignment differ (see docs/benchmarks.md, "Scale").
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py training config.", lock_config=True)
flags.DEFINE_integer("devices", None, "Number of fake devices to compile for.")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor to use instead of the config's mesh (one may be -1).")
flags.DEFINE_float("device_gb", 80.0, "Per-device memory to compare the plan against, GB.")
flags.mark_flags_as_required(["config", "devices"])

GB = 1e9


def plan(config: Any, devices: int, mesh_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Compile the train step of ``config`` for ``devices`` CPU devices; return the memory plan.

  Must run before anything initialises the JAX backend (it sets the CPU device count).
  """
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  import numpy as np

  from astrollama_jax import sharding
  from astrollama_jax.model.config import get_config
  from astrollama_jax.train import optimizer, setup, state as state_lib, step as step_lib

  if jax.device_count() != devices:
    raise RuntimeError(f"JAX already has {jax.device_count()} devices; run aot in a fresh process")
  cfg = get_config(config.model.preset, **setup.arch_overrides(config), **setup.policy(config))
  attention = cfg.attention_impl
  if attention == "cudnn":  # a GPU kernel: the CPU compiler plans XLA attention instead (S^2 scores)
    cfg = cfg.replace(attention_impl="xla")
  mesh = sharding.make_mesh(mesh_shape or tuple(config.mesh))
  setup.check_batch_layout(config, dict(mesh.shape))
  t = config.train
  tx, schedule = optimizer.make_optimizer(t, total_steps=1000)
  shapes, shardings = state_lib.abstract_state(cfg, tx, mesh)
  gbs, seq = t.global_batch_size, config.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((gbs, seq), np.float32 if k == "loss_mask" else np.int32, sharding=s)
           for k, s in step_lib.batch_shardings(mesh).items()}
  t0 = time.time()
  with jax.set_mesh(mesh):
    train_step = step_lib.make_train_step(cfg, tx, schedule, shardings, mesh,
                                          grad_accum=t.grad_accum_steps, loss_chunk=t.loss_chunk_size)
    lowered = train_step.lower(state_lib.with_shardings(shapes, shardings), batch)
    compiled = lowered.compile()
  mem = compiled.memory_analysis()
  n_params = cfg.num_params()
  moment_bytes = 2 if t.moments_dtype == "bfloat16" else 4
  per_device = {
      "arguments_gb": mem.argument_size_in_bytes / GB,
      "outputs_gb": mem.output_size_in_bytes / GB,
      "aliased_gb": mem.alias_size_in_bytes / GB,
      "temp_gb": mem.temp_size_in_bytes / GB,
      "code_gb": mem.generated_code_size_in_bytes / GB,
  }
  per_device["total_gb"] = (per_device["arguments_gb"] + per_device["outputs_gb"]
                            - per_device["aliased_gb"] + per_device["temp_gb"])
  return {
      "model": config.model.preset, "params_b": n_params / 1e9, "devices": devices,
      "mesh": dict(mesh.shape), "global_batch": gbs, "seq_len": seq,
      "micro_batch": gbs // t.grad_accum_steps, "grad_accum": t.grad_accum_steps,
      "remat": cfg.remat_policy, "attention": cfg.attention_impl + (" (config: cudnn)" if attention == "cudnn" else ""),
      "compute_dtype": cfg.compute_dtype, "moments_dtype": t.moments_dtype,
      "loss_chunk": t.loss_chunk_size,
      # What the state alone must take if evenly sharded: f32 master weights + two moments.
      "state_gb_analytic": n_params * (4 + 2 * moment_bytes) / devices / GB,
      **{k: round(v, 3) for k, v in per_device.items()},
      "compile_s": round(time.time() - t0, 1),
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mesh = tuple(int(x) for x in FLAGS.mesh.split(",")) if FLAGS.mesh else None
  result = plan(FLAGS.config, FLAGS.devices, mesh)
  result["fits"] = result["total_gb"] <= FLAGS.device_gb
  rows = [("model", f"{result['model']} ({result['params_b']:.2f}B params)"),
          ("devices / mesh", f"{result['devices']} / {result['mesh']}"),
          ("batch", f"{result['global_batch']} x {result['seq_len']} (micro-batch {result['micro_batch']}, "
                    f"accumulation {result['grad_accum']})"),
          ("remat / attention", f"{result['remat']} / {result['attention']}"),
          ("compute / moments dtype", f"{result['compute_dtype']} / {result['moments_dtype']}"),
          ("state, analytic (GB/device)", f"{result['state_gb_analytic']:.2f}"),
          ("arguments (GB/device)", f"{result['arguments_gb']:.2f}"),
          ("temporaries (GB/device)", f"{result['temp_gb']:.2f}"),
          ("outputs - aliased (GB/device)", f"{result['outputs_gb'] - result['aliased_gb']:.2f}"),
          ("total (GB/device)", f"{result['total_gb']:.2f}"),
          (f"fits {FLAGS.device_gb:g} GB", str(result["fits"])),
          ("compile (s)", f"{result['compile_s']}")]
  for name, value in rows:
    print(f"{name:<32} {value}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
