"""The JAX side of the benchmark: the trainer's compiled step and KV-cache decoding, timed.

The train step is the trainer's own program (``train.program.compile_train_step``) built from a
training config, so a number here is a number for ``train``. XLA reads its GPU flags and memory
fraction only when it creates its backend, so ``configure_xla`` must run before anything touches
a device; the torch reference (``bench_torch``) runs first for the same reason.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from astrollama_jax.errors import UserError
from astrollama_jax.perf import timing

XLA_PRESETS: dict[str, tuple[str, ...]] = {
  "none": (),
  "latency_hiding": (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
  ),
  "no_triton_gemm": ("--xla_gpu_enable_triton_gemm=false",),
  "no_command_buffer": ("--xla_gpu_enable_command_buffer=",),
}


def backends_initialized() -> bool:
  """Whether JAX has created a backend yet (``get_backend`` memoises the one it creates)."""
  if "jax" not in sys.modules:
    return False
  from jax.extend import backend

  return backend.get_backend.cache_info().currsize > 0


def configure_xla(presets: str, extra: str = "", mem_fraction: float = 0.0) -> str:
  """Put the flag presets into ``XLA_FLAGS`` before JAX creates a backend; returns the flags added.

  XLA reads its flags once, when the first backend is created: setting them later silently does
  nothing, so that case is an error rather than a misleading benchmark.
  """
  added: list[str] = []
  for name in [p.strip() for p in presets.split(",") if p.strip()]:
    if name not in XLA_PRESETS:
      raise UserError(f"unknown --xla_flags preset {name!r}; choose from {sorted(XLA_PRESETS)}")
    added.extend(XLA_PRESETS[name])
  added.extend(extra.split())
  if not added and not mem_fraction:
    return ""
  if backends_initialized():
    raise RuntimeError("XLA flags must be set before JAX initialises a backend")
  if added:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + added).strip()
  if mem_fraction:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(mem_fraction)
  return " ".join(added)


def model_config(config: Any, longest: int) -> Any:
  """The config's model, its positional limit raised to the longest sequence timed."""
  from astrollama_jax.train import resolve

  cfg = resolve.preset_model_config(config)
  return cfg.replace(max_seq_len=max(cfg.max_seq_len, longest))


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, Any]:
  """One batch in the pipelines' format: random tokens from the non-special vocabulary."""
  import numpy as np

  from astrollama_jax.data.packing import as_batch

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, seq + 1))
  return as_batch(
    {
      "tokens": ids[:, :-1],
      "targets": ids[:, 1:],
      "segment_ids": np.ones((batch, seq)),
      "positions": np.broadcast_to(np.arange(seq), (batch, seq)),
      "loss_mask": np.ones((batch, seq)),
    }
  )


def jax_settings(task: str, config: Any, cfg: Any) -> dict:
  """What the JAX side computes in: the config's dtypes (decode keeps weights in compute dtype)."""
  if task == "decode":
    return {"param_dtype": cfg.compute_dtype, "compute_dtype": cfg.compute_dtype}
  return {
    "param_dtype": cfg.param_dtype,
    "compute_dtype": cfg.compute_dtype,
    "moments_dtype": config.optimizer.moments_dtype,
    "optimizer": "optax adamw (XLA-fused)",
    "remat": cfg.remat_policy,
  }


def jax_peak_memory(devices: list[Any]) -> int | None:
  """Peak bytes in use on the busiest device; None where the backend keeps no statistics."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return max((p for p in peaks if p is not None), default=None)


def make_bench_mesh(shape: Any) -> Any:
  """The mesh ``config.mesh`` names; without a -1 it takes the first devices it needs."""
  import jax

  from astrollama_jax import sharding

  shape = [int(s) for s in shape]
  n = len(jax.devices()) if -1 in shape else math.prod(shape)
  return sharding.make_mesh(shape, jax.devices()[:n])


def matmul_probe(n: int, steps: int = 10) -> float:
  """Achieved TFLOP/s of one bf16 [n,n]x[n,n] matmul on the default device: the ceiling."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  t = timing.time_calls(lambda: f(a), steps, 2, jax.block_until_ready)
  return 2 * n**3 / t["median_s"] / 1e12


def jax_train(config: Any, cfg: Any, args: timing.Options, batch: dict, mesh: Any) -> dict:
  """Median time of the trainer's compiled step (``train.program``) on random weights.

  The state is built inside one jit (parameters, then the optimizer around them) so that its
  peak is the state itself, not parameters twice; the step is compiled ahead of time so compile
  time and XLA's own memory estimate are reported apart from the timed steps.
  """
  import jax

  from astrollama_jax.train import program as program_lib

  program = program_lib.compile_train_step(
    config, mesh, cfg=cfg, total_steps=args.warmup + args.steps
  )
  holder = {"state": program.init_state(config.seed)}
  dev_batch = jax.device_put(batch, {k: v.sharding for k, v in program.batch.items()})

  def one():
    holder["state"], holder["metrics"] = program.compiled(holder["state"], dev_batch)
    return holder["state"], holder["metrics"]

  out = timing.time_calls(one, args.steps, args.warmup, jax.block_until_ready)
  out["final_loss"] = float(holder["metrics"]["loss"])
  mem = program.compiled.memory_analysis()
  if mem is not None:
    need = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
    )
    out["compiled_memory_gb"] = need / 2**30
  out["compile_s"] = program.compile_s
  return out


def jax_decode(
  cfg: Any,
  args: timing.Options,
  prompts: list[list[int]],
  mesh: Any,
  seed: int,
  params: dict | None = None,
) -> dict:
  """Generated tokens/s of ``astrollama_jax.generation.generate``: greedy, weights in the compute
  dtype (as transformers serves them), EOS disabled so every row makes ``new_tokens`` tokens.
  ``params`` (host arrays: the reference's weights) replaces the random init."""
  from astrollama_jax.generation import generate
  from astrollama_jax.model import llama

  cfg = cfg.replace(param_dtype=cfg.compute_dtype)
  if params is None:
    params = llama.init_params(cfg, seed, mesh)
  else:
    params = llama.shard_params(cfg, params, mesh)
  holder = {}

  def run(n):
    def call():
      res = generate(cfg, params, prompts, n, eos_id=-1, mesh=mesh)
      if res.num_generated != len(prompts) * n:
        raise RuntimeError(f"generate made {res.num_generated} tokens, expected {len(prompts) * n}")
      holder["tokens"] = res.tokens
      return res

    return call

  full = timing.time_calls(run(args.new_tokens), args.steps, args.warmup, lambda _: None)
  tokens = holder["tokens"]
  first = timing.time_calls(run(1), args.steps, 1, lambda _: None)
  return {
    **timing.decode_rates(full["median_s"], first["median_s"], len(prompts), args.new_tokens),
    "warmup_s": full["warmup_s"],
    "decode_param_dtype": cfg.param_dtype,
    "tokens": tokens,
  }
