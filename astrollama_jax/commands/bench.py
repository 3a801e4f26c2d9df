"""Speed benchmark: the training step and KV-cache decoding, against transformers in PyTorch.

    python -m astrollama_jax bench --task=train --config=configs/bench.py:llama2_7b \
        --config.model.n_layers=8 --config.model.attention_impl=cudnn \
        --config.model.remat_policy=dots --xla_flags=latency_hiding [--reference=torch]
    python -m astrollama_jax bench --task=decode --config=configs/bench.py:llama2_7b \
        --config.train.global_batch_size=32 --prompt_len=512 --new_tokens=256 [--reference=torch]

Why it is built this way:

* The train task times exactly what ``train`` runs: the model, batch, optimizer, remat policy,
  attention implementation, chunked cross-entropy, micro-batches and sharding rules come from a
  training config (``--config`` and ``--config.*`` overrides, as for ``train``), and the step is
  the trainer's own compiled program (``train.program.compile_train_step``), so a number here is
  a number for training. FLOPs come from ``astrollama_jax.perf.flops`` (MaxText's counting), so MFU can
  be set beside MaxText's published figures.
* Step time is the median over timed steps after warm-up (the first call compiles), each step
  synchronised with ``jax.block_until_ready``; TFLOP/s are per device, MFU against the device's
  dense bf16 peak.
* XLA GPU flags and the memory fraction are only read when JAX creates its backend, so they are
  set in the environment before anything touches a device.
* ``--reference=torch`` runs the same shapes with transformers' ``LlamaForCausalLM`` (SDPA
  attention) in the same process, *before* JAX claims the GPU memory. It computes as the JAX side
  does on every device (``reference_settings``): master weights in ``model.param_dtype``,
  autocast to ``model.compute_dtype``, fused AdamW where torch has it, per-layer checkpointing
  where the config rematerialises; decoding runs both sides on the same weights and compares
  their greedy tokens. The tokens/s ratio is reported only when the two sides match
  (``mismatches``): a ratio against a handicapped reference says nothing. ``torch_only`` runs
  just that side (should the two CUDA stacks not share a process).

Prints a table and, last, one JSON line; ``--output`` appends that line to a file (the GPU sweep).
"""

from __future__ import annotations

from collections.abc import Callable
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from absl import app, flags, logging

from astrollama_jax.errors import UserError
from astrollama_jax.util import tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when the command runs, so importing this module defines none)."""
  from ml_collections import config_flags

  from astrollama_jax.commands import cli

  config_flags.DEFINE_config_file(
    "config",
    None,
    "A training config (configs/bench.py:PRESET, or any configs/*.py); "
    "--config.* overrides as for train.",
    lock_config=True,
  )
  flags.mark_flag_as_required("config")
  flags.DEFINE_enum("task", "train", ["train", "decode"], "What to time.")
  flags.DEFINE_integer("steps", 10, "Timed steps (train) or timed generate calls (decode).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first compiles).")
  flags.DEFINE_integer("prompt_len", 512, "Decode: prompt tokens per row.")
  flags.DEFINE_integer("new_tokens", 256, "Decode: generated tokens per row.")
  flags.DEFINE_enum(
    "reference",
    "none",
    ["none", "torch", "torch_only"],
    "Also (or only) time transformers' PyTorch LlamaForCausalLM on the same shapes.",
  )
  flags.DEFINE_string(
    "xla_flags",
    "none",
    "XLA flag preset(s), comma separated: none, latency_hiding, no_triton_gemm, no_command_buffer.",
  )
  flags.DEFINE_string("xla_extra", "", "Raw XLA flags appended to XLA_FLAGS.")
  flags.DEFINE_float(
    "mem_fraction", 0.0, "XLA_PYTHON_CLIENT_MEM_FRACTION for GPU (0: JAX's default)."
  )
  flags.DEFINE_float(
    "peak_tflops", 0.0, "Device bf16 peak TFLOP/s for MFU (0: look up the device kind)."
  )
  flags.DEFINE_integer(
    "matmul_probe",
    0,
    "Also time a bf16 N^3 matmul (N=8192 on a GPU): the achievable TFLOP/s (0: off).",
  )
  cli.define("output", help={"output": "Append the summary's JSON line to this file."})


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
      raise app.UsageError(
        f"unknown --xla_flags preset {name!r}; choose from {sorted(XLA_PRESETS)}"
      )
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


def model_config(config: Any, longest: int):
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


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, sync: Callable[[Any], Any]) -> dict:
  """Wall time of ``fn`` per call: ``warmup`` untimed calls, then ``steps`` synchronised ones."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    sync(fn())
  warm = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "max_s": max(times),
    "warmup_s": warm,
    "timed_steps": len(times),
  }


def rates(
  flops_per_step: float,
  tokens_per_step: int,
  step_s: float,
  n_devices: int,
  peak_flops: float | None,
) -> dict:
  """tokens/s, TFLOP/s per device and MFU of a step: the arithmetic the test checks."""
  tflops = flops_per_step / step_s / n_devices / 1e12
  return {
    "tokens_per_s": tokens_per_step / step_s,
    "tflops_per_device": tflops,
    "mfu": None if not peak_flops else tflops * 1e12 / peak_flops,
  }


# --- JAX side ------------------------------------------------------------------------------------


def jax_peak_memory(devices) -> int | None:
  """Peak bytes in use on the busiest device; None where the backend keeps no statistics."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return max((p for p in peaks if p is not None), default=None)


def make_bench_mesh(shape) -> Any:
  """The mesh ``config.mesh`` names; without a -1 it takes the first devices it needs."""
  import math

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
  t = time_calls(lambda: f(a), steps, 2, jax.block_until_ready)
  return 2 * n**3 / t["median_s"] / 1e12


def jax_train(config, cfg, args, batch: dict, mesh) -> dict:
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

  out = time_calls(one, args.steps, args.warmup, jax.block_until_ready)
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


def jax_decode(cfg, args, prompts: list[list[int]], mesh, seed: int, params=None) -> dict:
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

  full = time_calls(run(args.new_tokens), args.steps, args.warmup, lambda _: None)
  tokens = holder["tokens"]
  first = time_calls(run(1), args.steps, 1, lambda _: None)
  return {
    **decode_rates(full["median_s"], first["median_s"], len(prompts), args.new_tokens),
    "warmup_s": full["warmup_s"],
    "decode_param_dtype": cfg.param_dtype,
    "tokens": tokens,
  }


# --- PyTorch reference ---------------------------------------------------------------------------


def torch_device() -> str:
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def fused_adamw_available(dev: str) -> bool:
  """Whether this torch has a fused AdamW kernel for ``dev`` (CUDA, and CPU since torch 2.4)."""
  import torch

  try:
    p = torch.nn.Parameter(torch.zeros(2, device=dev))
    p.grad = torch.zeros_like(p)
    torch.optim.AdamW([p], fused=True).step()
  except (RuntimeError, ValueError):
    return False
  return True


def jax_settings(task: str, config, cfg) -> dict:
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


def reference_settings(task: str, cfg, fused_adamw: bool) -> dict:
  """What the torch side computes in, from the same config, on any device.

  Weights are kept in ``param_dtype`` (decode: the compute dtype, as the JAX side serves them)
  and the forward and backward run under ``torch.autocast`` to ``compute_dtype`` where the two
  differ; AdamW keeps its moments in the parameters' dtype; ``remat_policy`` full is per-layer
  gradient checkpointing. Anything torch cannot match shows up in ``mismatches``.
  """
  params = cfg.compute_dtype if task == "decode" else cfg.param_dtype
  out = {
    "param_dtype": params,
    "compute_dtype": cfg.compute_dtype,
    "autocast": cfg.compute_dtype if cfg.compute_dtype != params else None,
  }
  if task == "train":
    out.update(
      moments_dtype=params,
      optimizer="torch AdamW fused" if fused_adamw else "torch AdamW per-tensor loop",
      fused_adamw=fused_adamw,
      remat={"none": "none", "full": "full"}.get(cfg.remat_policy, "full (per layer)"),
      gradient_checkpointing=cfg.remat_policy != "none",
    )
  return out


def mismatches(ours: dict, ref: dict) -> list[str]:
  """Where the reference does not compute as the JAX side does (empty: like for like)."""
  out = [
    f"{k}: jax {ours[k]}, torch {ref.get(k)}"
    for k in ("param_dtype", "compute_dtype", "moments_dtype", "remat")
    if k in ours and ours[k] != ref.get(k)
  ]
  if ref.get("autocast") is not None and ref["autocast"] not in ("bfloat16", "float16"):
    out.append(f"autocast: torch cannot autocast up to {ref['autocast']}")
  if ref.get("fused_adamw") is False:
    out.append("optimizer: torch has no fused AdamW on this device")
  return out


def _torch_dtype(name: str):
  import torch

  return getattr(torch, name)


def _torch_model(cfg, param_dtype: str):
  """A random transformers LlamaForCausalLM with our shapes, built directly on the device."""
  import torch
  import transformers

  dev = torch_device()
  hf = {
    k: v
    for k, v in cfg.to_hf_config().items()
    if k not in ("architectures", "model_type", "torch_dtype")
  }
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(
      transformers.LlamaConfig(**hf), dtype=_torch_dtype(param_dtype), attn_implementation="sdpa"
    )
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  return model, dev


def _autocast(dev: str, settings: dict):
  import torch

  dtype = settings["autocast"]
  return torch.autocast(dev, dtype=_torch_dtype(dtype or "bfloat16"), enabled=dtype is not None)


def _torch_sync(dev: str) -> Callable[[Any], None]:
  import torch

  return (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)


def _torch_info(model, dev: str, settings: dict) -> dict:
  import torch
  import transformers

  cuda = dev == "cuda"
  return {
    "impl": "torch",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "attention": "sdpa",
    **settings,
    "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
  }


def torch_train(config, cfg, args, batch: dict) -> dict:
  """The same step in PyTorch: forward with labels, backward, clipping, AdamW (the config's
  ``optimizer`` and peak learning rate), computing as ``reference_settings`` says."""
  import torch

  dev = torch_device()
  settings = reference_settings("train", cfg, fused_adamw_available(dev))
  model, dev = _torch_model(cfg, settings["param_dtype"])
  model.train()
  if settings["gradient_checkpointing"]:
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
  o, micro = config.optimizer, config.train.grad_accum_steps
  opt = torch.optim.AdamW(
    model.parameters(),
    lr=config.schedule.learning_rate,
    betas=(o.adam_b1, o.adam_b2),
    eps=o.adam_eps,
    weight_decay=o.weight_decay,
    fused=settings["fused_adamw"] or None,
  )
  ids = torch.as_tensor(batch["tokens"], dtype=torch.long, device=dev)

  def step():
    for chunk in ids.chunk(micro):
      with _autocast(dev, settings):
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss / micro
      loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  out = time_calls(step, args.steps, args.warmup, _torch_sync(dev))
  return {**out, **_torch_info(model, dev, settings)}


def torch_params(model, cfg) -> dict:
  """The torch model's weights as our (numpy) parameter tree, in our dtype of its weights."""
  import ml_dtypes  # noqa: F401  (numpy learns bfloat16)
  import numpy as np

  from astrollama_jax.formats import mapping

  state = model.state_dict()
  dtype = str(next(model.parameters()).dtype).replace("torch.", "")

  def read(entry, shape):
    del shape
    for name in entry.hf_names(cfg.n_layers):
      yield state[name].float().cpu().numpy()

  params: dict = {}
  for path, arr in mapping.stack_params(cfg, read, np.dtype(dtype).name):
    mapping.set_path(params, path, arr)
  return params


def torch_decode(cfg, args, prompts: list[list[int]]) -> tuple[dict, dict]:
  """transformers' greedy ``generate`` (dynamic KV cache), exactly ``new_tokens`` a row, with
  weights in the compute dtype; returns (result, its weights as our parameters)."""
  import torch

  settings = reference_settings("decode", cfg, False)
  model, dev = _torch_model(cfg, settings["param_dtype"])
  model.eval()
  ids = torch.as_tensor(prompts, dtype=torch.long, device=dev)
  holder = {}

  def run(n):
    def call():
      with torch.no_grad(), _autocast(dev, settings):
        holder["out"] = model.generate(
          input_ids=ids,
          attention_mask=torch.ones_like(ids),
          do_sample=False,
          max_new_tokens=n,
          min_new_tokens=n,
          pad_token_id=0,
        )
      return holder["out"]

    return call

  full = time_calls(run(args.new_tokens), args.steps, args.warmup, _torch_sync(dev))
  tokens = holder["out"][:, ids.shape[1] :].tolist()
  first = time_calls(run(1), args.steps, 1, _torch_sync(dev))
  result = {
    **decode_rates(full["median_s"], first["median_s"], len(prompts), args.new_tokens),
    "warmup_s": full["warmup_s"],
    **_torch_info(model, dev, settings),
    "tokens": tokens,
  }
  return result, torch_params(model, cfg)


def token_agreement(ours: list[list[int]], ref: list[list[int]]) -> dict:
  """How far two greedy continuations agree: identical rows, and tokens before the first
  difference (after one, the two continue from different histories)."""
  common = []
  for a, b in zip(ours, ref):
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    common.append(n)
  total = sum(len(r) for r in ref)
  return {
    "tokens_identical": ours == ref,
    "rows_identical": sum(a == b for a, b in zip(ours, ref)),
    "common_prefix_fraction": sum(common) / total if total else None,
  }


def decode_rates(full_s: float, first_s: float, batch: int, new_tokens: int) -> dict:
  """End-to-end generated tokens/s, and the per-token rate once the prompt is in (prefill)."""
  steady = full_s - first_s
  return {
    "time_s": full_s,
    "prefill_s": first_s,
    "tokens_per_s": batch * new_tokens / full_s,
    "decode_tokens_per_s": batch * (new_tokens - 1) / steady if steady > 0 else None,
  }


def guarded(fn: Callable[[], dict], side: str) -> dict:
  """Run one side; out of memory is a result (the sweep looks for what fits), not a crash.

  Whatever happens, memory the torch side cached is handed back before the next side runs.
  """
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - only out-of-memory is swallowed, the rest re-raised
    text = f"{type(e).__name__}: {e}"
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    logging.error("%s ran out of memory: %s", side, text[:500])
    return {"error": "out of memory", "error_detail": text[:300]}
  finally:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
      torch.cuda.empty_cache()


# --- report --------------------------------------------------------------------------------------


def versions() -> dict:
  import jax
  import jaxlib

  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
  for mod in ("flax", "optax", "torch", "transformers"):
    if mod in sys.modules:
      out[mod] = sys.modules[mod].__version__
  return out


def _fmt(v: Any) -> str:
  return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(side: dict) -> str:
  """One cell: what a side computes in (weights, compute, optimizer moments)."""
  out = f"params {side.get('param_dtype')}, compute {side.get('compute_dtype')}"
  if side.get("autocast"):
    out += " (autocast)"
  if side.get("moments_dtype"):
    out += f", moments {side['moments_dtype']}"
  return out


def report(summary: dict) -> None:
  """The headline numbers, JAX beside the reference when there is one, then the JSON line."""

  ref = summary.get("reference")
  ours = summary.get("computes", {})
  keys = ["step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gb", "error"]
  if summary["task"] == "decode":
    keys = ["time_s", "prefill_s", "tokens_per_s", "decode_tokens_per_s", "peak_memory_gb", "error"]
  rows = [("computes in", describe(ours), describe(ref) if ref else "")]
  if summary["task"] == "train":
    rows.append(
      (
        "optimizer / remat",
        f"{ours.get('optimizer')} / {ours.get('remat')}",
        f"{ref.get('optimizer')} / {ref.get('remat')}" if ref else "",
      )
    )
  rows += [
    (k, _fmt(summary.get(k)), _fmt(ref.get(k)) if ref else "")
    for k in keys
    if k != "error" or summary.get(k) or (ref or {}).get(k)
  ]
  if "tokens_identical" in summary:
    rows.append(
      (
        "same greedy tokens",
        f"{'yes' if summary['tokens_identical'] else 'no'}: {summary['rows_identical']} of "
        f"{summary['batch']} rows, common prefix {summary['common_prefix_fraction']:.1%}",
        "",
      )
    )
  if summary.get("speedup_vs_reference") is not None:
    rows.append(("jax / torch tokens/s", f"{summary['speedup_vs_reference']:.3f}", ""))
  for m in summary.get("reference_mismatches") or ():
    rows.append(("not like for like, no ratio", m, ""))
  tables.report(
    f"bench {summary['task']}: {summary['model']} on {summary['n_devices'] or 1} x "
    f"{summary['device']}",
    summary,
    rows=rows,
    columns=("metric", "jax", "torch" if ref else "-"),
  )


def start_jax(config, args, summary: dict):
  """Create JAX's backend, the mesh and the device facts, only once the torch side is done:
  on a GPU the backend claims its memory (``--mem_fraction``) as soon as it starts."""
  import jax

  from astrollama_jax.perf import flops

  mesh = make_bench_mesh(config.mesh)
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(device.device_kind)
  summary.update(
    platform=device.platform,
    device=device.device_kind,
    n_devices=mesh.devices.size,
    peak_tflops=peak / 1e12 if peak else None,
  )
  if args.matmul_probe:
    summary["matmul_tflops"] = matmul_probe(args.matmul_probe)
  return mesh, peak


def run_train(config, cfg, args, summary: dict) -> dict | None:
  """Time the reference (first) and the train step; fills ``summary``, returns the reference's."""
  from astrollama_jax.perf import flops

  rows, seq = config.train.global_batch_size, config.data.seq_len
  batch = synthetic_batch(cfg.vocab_size, rows, seq, config.seed)
  step_flops = flops.training_flops(cfg, rows, seq).total
  tokens = rows * seq
  summary.update(
    seq=seq,
    bf16_moments=config.optimizer.moments_dtype == "bfloat16",
    micro_batches=config.train.grad_accum_steps,
    ce_chunk=config.loss.chunk_size,
    flops_per_step=step_flops,
    tokens_per_step=tokens,
  )

  def finish(res: dict, n: int, peak: float | None) -> dict:
    if "median_s" in res:
      step_s = res.pop("median_s")
      res.update(
        step_time_s=step_s,
        step_time_min_s=res.pop("min_s"),
        step_time_max_s=res.pop("max_s"),
        **rates(step_flops, tokens, step_s, n, peak),
      )
    return res

  summary["computes"] = jax_settings("train", config, cfg)
  ref = None
  if args.reference != "none":
    ref = guarded(lambda: torch_train(config, cfg, args, batch), "torch")
    ref_peak = (
      args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(ref.get("device", ""))
    )
    ref = finish(ref, 1, ref_peak)
  if args.reference != "torch_only":
    mesh, peak = start_jax(config, args, summary)
    summary.update(
      finish(
        guarded(lambda: jax_train(config, cfg, args, batch, mesh), "jax"),
        summary["n_devices"],
        peak,
      )
    )
    summary["peak_memory_bytes"] = jax_peak_memory(list(mesh.devices.flat))
  return ref


def run_decode(config, cfg, args, summary: dict) -> dict | None:
  """Time the reference's generation, then ours on its weights, and compare their tokens;
  fills ``summary``, returns the reference's."""
  import numpy as np

  prompts = (
    np.random.default_rng(config.seed)
    .integers(3, cfg.vocab_size, size=(config.train.global_batch_size, args.prompt_len))
    .tolist()
  )
  summary.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
  summary["computes"] = jax_settings("decode", config, cfg)
  ref, weights = None, None
  if args.reference != "none":
    holder = {}

    def reference():
      res, holder["weights"] = torch_decode(cfg, args, prompts)
      return res

    ref = guarded(reference, "torch")
    weights = holder.pop("weights", None)
  if args.reference != "torch_only":
    mesh, _ = start_jax(config, args, summary)
    summary.update(
      guarded(lambda: jax_decode(cfg, args, prompts, mesh, config.seed, weights), "jax")
    )
    summary["peak_memory_bytes"] = jax_peak_memory(list(mesh.devices.flat))
    if ref is not None and "tokens" in ref and "tokens" in summary:
      summary.update(token_agreement(summary["tokens"], ref["tokens"]))
  summary.pop("tokens", None)
  if ref is not None:
    ref.pop("tokens", None)
  return ref


def attach_reference(summary: dict, ref: dict) -> None:
  """Put the reference beside our numbers; the tokens/s ratio only where it is like for like."""
  summary["reference"] = ref
  summary["device"] = summary["device"] or ref.get("device")
  summary["reference_mismatches"] = [] if "error" in ref else mismatches(summary["computes"], ref)
  if summary["reference_mismatches"]:
    logging.warning("the reference is not like for like: %s", summary["reference_mismatches"])
  elif summary.get("tokens_per_s") and ref.get("tokens_per_s"):
    summary["speedup_vs_reference"] = summary["tokens_per_s"] / ref["tokens_per_s"]


def main(argv: list[str]) -> None:
  from astrollama_jax import sharding
  from astrollama_jax.commands import cli
  from astrollama_jax.train import resolve

  cli.no_extra_args(argv)
  args, config = FLAGS, FLAGS.config
  if args.steps < 1 or args.warmup < 0:
    raise UserError(f"need --steps >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
  longest = config.data.seq_len if args.task == "train" else args.prompt_len + args.new_tokens
  cfg = model_config(config, longest)
  if args.task == "train":
    resolve.check_compatible(cfg, config, None)
  added_flags = configure_xla(args.xla_flags, args.xla_extra, args.mem_fraction)
  summary: dict[str, Any] = {
    "task": args.task,
    "model": f"{config.model.preset} x{cfg.n_layers} layers",
    "preset": config.model.preset,
    "layers": cfg.n_layers,
    "params": cfg.num_params(),
    "batch": config.train.global_batch_size,
    "attention": cfg.attention_impl,
    "remat": cfg.remat_policy,
    "param_dtype": cfg.param_dtype,
    "compute_dtype": cfg.compute_dtype,
    "platform": None,
    "device": None,
    "n_devices": None,
    "mesh": ",".join(str(m) for m in config.mesh),
    "xla_flags": added_flags,
    "peak_tflops": None,
    "command": " ".join(["python -m astrollama_jax bench"] + sys.argv[1:]),
  }
  with sharding.use_rules(resolve.sharding_rules(config)):
    ref = (run_train if args.task == "train" else run_decode)(config, cfg, args, summary)
  mem = summary.pop("peak_memory_bytes", None)
  summary["peak_memory_gb"] = None if mem is None else mem / 2**30
  if ref is not None:
    attach_reference(summary, ref)
  summary["versions"] = versions()
  report(summary)
  if args.output:
    with open(args.output, "a") as f:
      f.write(json.dumps(tables.jsonable(summary), ensure_ascii=False) + "\n")
  if "error" in summary or (ref and "error" in ref):
    sys.exit(3)
