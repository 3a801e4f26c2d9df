"""One benchmark run: the reference first, then the JAX side, and how the two compare.

``run`` times a training config's train step (``task="train"``) or KV-cache decoding
(``task="decode"``) and returns the summary the ``bench`` command prints. The torch reference
(``bench_torch``) runs before JAX creates its backend (on a GPU the backend claims the device's
memory as it starts); decoding then runs the JAX side on the reference's weights so that the
greedy tokens of the two can be compared. Out of memory is a result, not a crash: the GPU sweep
looks for what fits.
"""

from __future__ import annotations

from collections.abc import Callable
import gc
import sys
from typing import Any

from absl import logging

from astrollama_jax.perf import bench_jax, bench_report, bench_torch, flops, timing


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


def attach_reference(summary: dict, ref: dict) -> None:
  """Put the reference beside our numbers; the tokens/s ratio only where it is like for like."""
  summary["reference"] = ref
  summary["device"] = summary["device"] or ref.get("device")
  summary["reference_mismatches"] = (
    [] if "error" in ref else bench_torch.mismatches(summary["computes"], ref)
  )
  if summary["reference_mismatches"]:
    logging.warning("the reference is not like for like: %s", summary["reference_mismatches"])
  elif summary.get("tokens_per_s") and ref.get("tokens_per_s"):
    summary["speedup_vs_reference"] = summary["tokens_per_s"] / ref["tokens_per_s"]


def start_jax(config: Any, args: timing.Options, summary: dict) -> tuple[Any, float | None]:
  """Create JAX's backend, the mesh and the device facts, only once the torch side is done:
  on a GPU the backend claims its memory (``--mem_fraction``) as soon as it starts."""
  import jax

  mesh = bench_jax.make_bench_mesh(config.mesh)
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(device.device_kind)
  summary.update(
    platform=device.platform,
    device=device.device_kind,
    n_devices=mesh.devices.size,
    peak_tflops=peak / 1e12 if peak else None,
  )
  if args.matmul_probe:
    summary["matmul_tflops"] = bench_jax.matmul_probe(args.matmul_probe)
  return mesh, peak


def run_train(config: Any, cfg: Any, args: timing.Options, summary: dict) -> dict | None:
  """Time the reference (first) and the train step; fills ``summary``, returns the reference's."""
  rows, seq = config.train.global_batch_size, config.data.seq_len
  batch = bench_jax.synthetic_batch(cfg.vocab_size, rows, seq, config.seed)
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
        **timing.rates(step_flops, tokens, step_s, n, peak),
      )
    return res

  summary["computes"] = bench_jax.jax_settings("train", config, cfg)
  ref = None
  if args.reference != "none":
    ref = guarded(lambda: bench_torch.torch_train(config, cfg, args, batch), "torch")
    ref_peak = (
      args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(ref.get("device", ""))
    )
    ref = finish(ref, 1, ref_peak)
  if args.reference != "torch_only":
    mesh, peak = start_jax(config, args, summary)
    summary.update(
      finish(
        guarded(lambda: bench_jax.jax_train(config, cfg, args, batch, mesh), "jax"),
        summary["n_devices"],
        peak,
      )
    )
    summary["peak_memory_bytes"] = bench_jax.jax_peak_memory(list(mesh.devices.flat))
  return ref


def run_decode(config: Any, cfg: Any, args: timing.Options, summary: dict) -> dict | None:
  """Time the reference's generation, then ours on its weights, and compare their tokens;
  fills ``summary``, returns the reference's."""
  import numpy as np

  prompts = (
    np.random.default_rng(config.seed)
    .integers(3, cfg.vocab_size, size=(config.train.global_batch_size, args.prompt_len))
    .tolist()
  )
  summary.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
  summary["computes"] = bench_jax.jax_settings("decode", config, cfg)
  ref, weights = None, None
  if args.reference != "none":
    holder = {}

    def reference():
      res, holder["weights"] = bench_torch.torch_decode(cfg, args, prompts)
      return res

    ref = guarded(reference, "torch")
    weights = holder.pop("weights", None)
  if args.reference != "torch_only":
    mesh, _ = start_jax(config, args, summary)
    summary.update(
      guarded(lambda: bench_jax.jax_decode(cfg, args, prompts, mesh, config.seed, weights), "jax")
    )
    summary["peak_memory_bytes"] = bench_jax.jax_peak_memory(list(mesh.devices.flat))
    if ref is not None and "tokens" in ref and "tokens" in summary:
      summary.update(token_agreement(summary["tokens"], ref["tokens"]))
  summary.pop("tokens", None)
  if ref is not None:
    ref.pop("tokens", None)
  return ref


def run(config: Any, args: timing.Options, xla_flags: str = "", command: str = "") -> dict:
  """Benchmark ``config`` as ``args`` say; the summary the report prints (and the JSON line).

  ``xla_flags`` (what ``bench_jax.configure_xla`` added) and ``command`` are recorded in it so
  that a figure keeps the command and flags that made it.
  """
  from astrollama_jax import sharding
  from astrollama_jax.train import resolve

  longest = config.data.seq_len if args.task == "train" else args.prompt_len + args.new_tokens
  cfg = bench_jax.model_config(config, longest)
  if args.task == "train":
    resolve.check_compatible(cfg, config, None)
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
    "xla_flags": xla_flags,
    "peak_tflops": None,
    "command": command,
  }
  with sharding.use_rules(resolve.sharding_rules(config)):
    ref = (run_train if args.task == "train" else run_decode)(config, cfg, args, summary)
  mem = summary.pop("peak_memory_bytes", None)
  summary["peak_memory_gb"] = None if mem is None else mem / 2**30
  if ref is not None:
    attach_reference(summary, ref)
  summary["versions"] = bench_report.versions()
  return summary
