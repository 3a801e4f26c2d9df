"""The per-device memory plan of a config's train step, compiled for fake CPU devices.

Nothing is allocated: the train state and the batch are abstract shapes carrying the shardings
the run would use, and the trainer's own step (``train.program.compile_train_step``) is lowered
and compiled for N CPU devices laid out as the config's mesh. XLA's plan (arguments, outputs,
temporaries; donated outputs alias their inputs) stands beside an analytic count of the state.
The CPU compiler stands in for the accelerator's: same sharding and same program, but its
fusion and buffer assignment differ (``tpu_plan`` compiles with libtpu's own compiler instead).
"""

from __future__ import annotations

from typing import Any

GB = 1e9


def plan(config: Any, devices: int, device_gb: float = 80.0) -> dict[str, Any]:
  """Compile the train step of ``config`` for ``devices`` CPU devices; the memory plan, and
  whether it fits ``device_gb`` per device.

  Must run before anything initialises the JAX backend (it sets the CPU device count).
  """
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  if jax.device_count() != devices:
    raise RuntimeError(f"JAX already has {jax.device_count()} devices; run aot in a fresh process")
  result = memory_plan(config)
  result.update(
    fits=result["total_gb"] <= device_gb,
    device_gb=device_gb,
    target=f"cpu-{devices}",
    peak_gib=round(result["total_gb"] * GB / 2**30, 3),
    hbm_gib=round(device_gb * GB / 2**30, 3),
    kernel_calls=0,
  )
  return result


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


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
  """The table of a plan (``plan``): (quantity, value) rows."""
  lora = result["lora"]
  return [
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
      + (f" (LoRA rank {lora['rank']}, base {result['base_dtype']})" if lora else ""),
    ),
    ("remat / attention", f"{result['remat']} / {result['attention']}"),
    ("compute / moments dtype", f"{result['compute_dtype']} / {result['moments_dtype']}"),
    ("state, analytic (GB/device)", f"{result['state_gb_analytic']:.2f}"),
    ("arguments (GB/device)", f"{result['arguments_gb']:.2f}"),
    ("temporaries (GB/device)", f"{result['temp_gb']:.2f}"),
    ("outputs - aliased (GB/device)", f"{result['outputs_gb'] - result['aliased_gb']:.2f}"),
    ("total (GB/device)", f"{result['total_gb']:.2f}"),
    (f"fits {result['device_gb']:g} GB", str(result["fits"])),
    ("compile (s)", f"{result['compile_s']}"),
  ]
