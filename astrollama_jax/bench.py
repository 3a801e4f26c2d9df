"""Speed benchmark: the training step and KV-cache decoding, against transformers in PyTorch.

    python -m astrollama_jax.bench --task=train --preset=llama2_7b --layers=8 --seq=4096 --batch=1 \
        --attention=cudnn --remat=dots --xla_flags=latency_hiding [--reference=torch]
    python -m astrollama_jax.bench --task=decode --preset=llama2_7b --batch=32 \
        --prompt_len=512 --new_tokens=256 [--reference=torch]

Why it is built this way:

* The train task times exactly what ``train`` runs (the same step function, optimizer, remat
  policy, attention implementation, chunked cross-entropy and micro-batches), so a number here is a
  number for training. FLOPs come from ``astrollama_jax.flops`` (MaxText's counting), so MFU can
  be set beside MaxText's published figures.
* Step time is the median over timed steps after warm-up (the first call compiles), each step
  synchronised with ``jax.block_until_ready``; TFLOP/s are per device, MFU against the device's
  dense bf16 peak.
* XLA GPU flags and the memory fraction are only read when JAX creates its backend, so they are
  set in the environment before anything touches a device.
* ``--reference=torch`` runs the same shapes with transformers' ``LlamaForCausalLM`` (SDPA
  attention, AdamW; bf16 on GPU, float32 on CPU) in the same process, *before* JAX claims the
  GPU memory, and reports the ratio of tokens/s. ``torch_only`` runs just that side (should the
  two CUDA stacks not share a process).

Prints a table and, last, one JSON line; ``--out`` appends that line to a file (the GPU sweep).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined from ``__main__`` only, so importing this module defines none)."""
  flags.DEFINE_enum("task", "train", ["train", "decode"], "What to time.")
  flags.DEFINE_string("preset", "llama2_7b", "Model preset (astrollama_jax.model.config.PRESETS).")
  flags.DEFINE_integer("layers", 0, "Override the number of layers (0: the preset's).")
  flags.DEFINE_integer("seq", 4096, "Training sequence length.")
  flags.DEFINE_integer("batch", 1, "Global batch (rows per optimizer step, or decode batch).")
  flags.DEFINE_enum("attention", "xla", ["xla", "jax", "cudnn"], "Attention implementation.")
  flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch", "qkv_out", "minimal"],
                    "Rematerialisation policy of the layer scan.")
  flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Parameter (master weight) dtype.")
  flags.DEFINE_enum("compute_dtype", "bfloat16", ["float32", "bfloat16"], "Activation dtype.")
  flags.DEFINE_bool("bf16_moments", False, "Keep Adam moments in bfloat16.")
  flags.DEFINE_integer("micro_batches", 1, "Gradient-accumulation micro-batches per step.")
  flags.DEFINE_integer("ce_chunk", 0, "Chunked cross-entropy chunk (tokens); 0: one full logits tensor.")
  flags.DEFINE_integer("steps", 10, "Timed steps (train) or timed generate calls (decode).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first compiles).")
  flags.DEFINE_integer("prompt_len", 512, "Decode: prompt tokens per row.")
  flags.DEFINE_integer("new_tokens", 256, "Decode: generated tokens per row.")
  flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor mesh shape (-1: the remaining devices).")
  flags.DEFINE_enum("reference", "none", ["none", "torch", "torch_only"],
                    "Also (or only) time transformers' PyTorch LlamaForCausalLM on the same shapes.")
  flags.DEFINE_string("xla_flags", "none", "XLA flag preset(s), comma separated: "
                      "none, latency_hiding, no_triton_gemm, no_command_buffer.")
  flags.DEFINE_string("xla_extra", "", "Raw XLA flags appended to XLA_FLAGS.")
  flags.DEFINE_float("mem_fraction", 0.0, "XLA_PYTHON_CLIENT_MEM_FRACTION for GPU (0: JAX's default).")
  flags.DEFINE_float("peak_tflops", 0.0, "Device bf16 peak TFLOP/s for MFU (0: look up the device kind).")
  flags.DEFINE_integer("matmul_probe", 0, "Also time a bf16 N^3 matmul (N=8192 on a GPU): the "
                       "achievable TFLOP/s (0: off).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and tokens.")
  flags.DEFINE_string("out", "", "Append the JSON line to this file.")


XLA_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "latency_hiding": ("--xla_gpu_enable_latency_hiding_scheduler=true",
                       "--xla_gpu_enable_highest_priority_async_stream=true"),
    "no_triton_gemm": ("--xla_gpu_enable_triton_gemm=false",),
    "no_command_buffer": ("--xla_gpu_enable_command_buffer=",),
}


def configure_xla(presets: str, extra: str = "", mem_fraction: float = 0.0) -> str:
  """Put the flag presets into ``XLA_FLAGS`` before JAX creates a backend; returns the flags added.

  XLA reads its flags once, when the first backend is created: setting them later silently does
  nothing, so that case is an error rather than a misleading benchmark.
  """
  added: list[str] = []
  for name in [p.strip() for p in presets.split(",") if p.strip()]:
    if name not in XLA_PRESETS:
      raise app.UsageError(f"unknown --xla_flags preset {name!r}; choose from {sorted(XLA_PRESETS)}")
    added.extend(XLA_PRESETS[name])
  added.extend(extra.split())
  if not added and not mem_fraction:
    return ""
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("XLA flags must be set before JAX initialises a backend")
  if added:
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + added).strip()
  if mem_fraction:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(mem_fraction)
  return " ".join(added)


def model_config(preset: str, layers: int, **kw: Any):
  from astrollama_jax.model.config import get_config
  cfg = get_config(preset, **kw)
  return cfg.replace(n_layers=layers) if layers else cfg


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, Any]:
  """One batch in the pipelines' format, random tokens from the non-special part of the vocabulary."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, seq + 1), dtype=np.int32)
  return {
      "tokens": ids[:, :-1],
      "targets": ids[:, 1:],
      "segment_ids": np.ones((batch, seq), np.int32),
      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
      "loss_mask": np.ones((batch, seq), np.float32),
  }


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
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "warmup_s": warm, "timed_steps": len(times)}


def rates(flops_per_step: float, tokens_per_step: int, step_s: float, n_devices: int,
          peak_flops: float | None) -> dict:
  """tokens/s, TFLOP/s per device and MFU of a step: the arithmetic the test checks."""
  tflops = flops_per_step / step_s / n_devices / 1e12
  return {"tokens_per_s": tokens_per_step / step_s,
          "tflops_per_device": tflops,
          "mfu": None if not peak_flops else tflops * 1e12 / peak_flops}


# --- JAX side ------------------------------------------------------------------------------------

def jax_peak_memory(devices) -> int | None:
  """Peak bytes in use on the busiest device, or None where the backend keeps no statistics (CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  return max((p for p in peaks if p is not None), default=None)


def make_bench_mesh(spec: str):
  """The mesh from ``--mesh``; without a -1 it takes the first devices it needs."""
  import math
  import jax
  from astrollama_jax import sharding
  shape = [int(s) for s in spec.split(",")]
  n = len(jax.devices()) if -1 in shape else math.prod(shape)
  return sharding.make_mesh(shape, jax.devices()[:n])


def matmul_probe(n: int, steps: int = 10) -> float:
  """Achieved TFLOP/s of one bf16 [n,n]x[n,n] matmul on the default device: the practical ceiling."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  t = time_calls(lambda: f(a), steps, 2, jax.block_until_ready)
  return 2 * n ** 3 / t["median_s"] / 1e12


def train_hparams(args):
  """The training defaults (``train/defaults.py``) with the bench's optimizer-side options."""
  from astrollama_jax.train.defaults import base_config
  train = base_config().train
  train.moments_dtype = "bfloat16" if args.bf16_moments else "float32"
  train.grad_accum_steps, train.loss_chunk_size = args.micro_batches, args.ce_chunk
  return train


def jax_train(cfg, args, batch: dict, mesh) -> dict:
  """Median time of the real training step (``astrollama_jax.train.step``) on random weights.

  The state is built inside one jit (parameters, then the optimizer around them) so that its
  peak is the state itself, not parameters twice; the step is compiled ahead of time so compile
  time and XLA's own memory estimate are reported apart from the timed steps.
  """
  import jax
  from astrollama_jax.model import llama
  from astrollama_jax.train import optimizer, state as state_lib, step as step_lib
  hp = train_hparams(args)
  tx, schedule = optimizer.make_optimizer(hp, args.warmup + args.steps)
  _, shardings = state_lib.abstract_state(cfg, tx, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: state_lib.create_state(llama.init_params(cfg, args.seed, mesh), tx,
                                                   shardings, args.seed), out_shardings=shardings)()
    train_step = step_lib.make_train_step(cfg, tx, schedule, shardings, mesh,
                                          grad_accum=hp.grad_accum_steps, loss_chunk=hp.loss_chunk_size)
    dev_batch = jax.device_put(batch, step_lib.batch_shardings(mesh))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    del state

    def one():
      holder["state"], holder["metrics"] = compiled(holder["state"], dev_batch)
      return holder["state"], holder["metrics"]

    out = time_calls(one, args.steps, args.warmup, jax.block_until_ready)
  out["final_loss"] = float(holder["metrics"]["loss"])
  mem = compiled.memory_analysis()
  if mem is not None:
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    out["compiled_memory_gb"] = need / 2 ** 30
  out["compile_s"] = compile_s
  return out


def jax_decode(cfg, args, prompts: list[list[int]], mesh) -> dict:
  """Generated tokens/s of ``astrollama_jax.generate.generate``: greedy, weights in the compute
  dtype (as transformers serves them), EOS disabled so every row makes ``new_tokens`` tokens."""
  from astrollama_jax.generate import generate
  from astrollama_jax.model import llama
  cfg = cfg.replace(param_dtype=cfg.compute_dtype)
  params = llama.init_params(cfg, args.seed, mesh)

  def run(n):
    def call():
      res = generate(cfg, params, prompts, n, eos_id=-1, mesh=mesh)
      if res.num_generated != len(prompts) * n:
        raise RuntimeError(f"generate made {res.num_generated} tokens, expected {len(prompts) * n}")
      return res
    return call

  full = time_calls(run(args.new_tokens), args.steps, args.warmup, lambda _: None)
  first = time_calls(run(1), args.steps, 1, lambda _: None)
  return {**decode_rates(full["median_s"], first["median_s"], len(prompts), args.new_tokens),
          "warmup_s": full["warmup_s"], "decode_param_dtype": cfg.param_dtype}


# --- PyTorch reference ---------------------------------------------------------------------------

def _torch_model(cfg, bf16_params: bool):
  """A random transformers LlamaForCausalLM with our shapes, built directly on the device."""
  import torch
  import transformers
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  hf = {k: v for k, v in cfg.to_hf_config().items()
        if k not in ("architectures", "model_type", "torch_dtype")}
  dtype = torch.bfloat16 if (dev == "cuda" and bf16_params) else torch.float32
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(**hf), dtype=dtype, attn_implementation="sdpa")
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  return model, dev


def _torch_sync(dev: str) -> Callable[[Any], None]:
  import torch
  return (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)


def _torch_info(model, dev: str) -> dict:
  import torch
  import transformers
  cuda = dev == "cuda"
  return {"impl": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
          "device": torch.cuda.get_device_name() if cuda else "cpu", "attention": "sdpa",
          "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
          "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}


def torch_train(cfg, args, batch: dict) -> dict:
  """The same step in PyTorch: forward with labels, backward, clipping, fused AdamW (same hparams).

  Parameters follow ``--param_dtype`` (float32 master weights under bf16 autocast, or pure bf16
  weights and moments); ``--remat`` other than none turns on per-layer gradient checkpointing.
  On CPU everything is float32 (a smoke run, not a comparison).
  """
  import torch
  model, dev = _torch_model(cfg, bf16_params=args.param_dtype == "bfloat16")
  model.train()
  if args.remat != "none":
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
  hp = train_hparams(args)
  opt = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, betas=(hp.adam_b1, hp.adam_b2),
                          eps=hp.adam_eps, weight_decay=hp.weight_decay, fused=dev == "cuda")
  ids = torch.as_tensor(batch["tokens"], dtype=torch.long, device=dev)
  autocast = dev == "cuda" and args.compute_dtype == "bfloat16"

  def step():
    for chunk in ids.chunk(args.micro_batches):
      with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss / args.micro_batches
      loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  out = time_calls(step, args.steps, args.warmup, _torch_sync(dev))
  return {**out, **_torch_info(model, dev), "gradient_checkpointing": args.remat != "none"}


def torch_decode(cfg, args, prompts: list[list[int]]) -> dict:
  """transformers' ``generate``: greedy, its default dynamic KV cache, exactly ``new_tokens`` a row."""
  import torch
  model, dev = _torch_model(cfg, bf16_params=args.compute_dtype == "bfloat16")
  model.eval()
  ids = torch.as_tensor(prompts, dtype=torch.long, device=dev)

  def run(n):
    def call():
      with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return call

  full = time_calls(run(args.new_tokens), args.steps, args.warmup, _torch_sync(dev))
  first = time_calls(run(1), args.steps, 1, _torch_sync(dev))
  return {**decode_rates(full["median_s"], first["median_s"], len(prompts), args.new_tokens),
          "warmup_s": full["warmup_s"], **_torch_info(model, dev)}


def decode_rates(full_s: float, first_s: float, batch: int, new_tokens: int) -> dict:
  """End-to-end generated tokens/s, and the per-token rate once the prompt is in (prefill)."""
  steady = full_s - first_s
  return {"time_s": full_s, "prefill_s": first_s, "tokens_per_s": batch * new_tokens / full_s,
          "decode_tokens_per_s": batch * (new_tokens - 1) / steady if steady > 0 else None}


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


def print_table(summary: dict) -> None:
  """The headline numbers, JAX beside the reference when there is one."""
  ref = summary.get("reference")
  keys = ["step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gb", "error"]
  if summary["task"] == "decode":
    keys = ["time_s", "prefill_s", "tokens_per_s", "decode_tokens_per_s", "peak_memory_gb", "error"]
  rows = [("", "jax", "torch" if ref else "")]
  rows += [(k, _fmt(summary.get(k)), _fmt(ref.get(k)) if ref else "") for k in keys
           if k != "error" or summary.get(k) or (ref or {}).get(k)]
  width = [max(len(r[i]) for r in rows) for i in range(3)]
  print(f"bench {summary['task']}: {summary['model']} on {summary['n_devices'] or 1} x {summary['device']}")
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
  if summary.get("speedup_vs_reference") is not None:
    print(f"jax / torch tokens/s: {summary['speedup_vs_reference']:.3f}")


def start_jax(args, summary: dict):
  """Create JAX's backend, the mesh and the device facts, only once the torch side is done:
  on a GPU the backend claims its memory (``--mem_fraction``) as soon as it starts."""
  import jax
  from astrollama_jax import flops
  mesh = make_bench_mesh(args.mesh)
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(device.device_kind)
  summary.update(platform=device.platform, device=device.device_kind, n_devices=mesh.devices.size,
                 peak_tflops=peak / 1e12 if peak else None)
  if args.matmul_probe:
    summary["matmul_tflops"] = matmul_probe(args.matmul_probe)
  return mesh, peak


def run_train(cfg, args, summary: dict) -> dict | None:
  """Time the reference (first) and the train step; fills ``summary``, returns the reference's."""
  from astrollama_jax import flops
  batch = synthetic_batch(cfg.vocab_size, args.batch, args.seq, args.seed)
  step_flops = flops.training_flops(cfg, args.batch, args.seq).total
  tokens = args.batch * args.seq
  summary.update(seq=args.seq, bf16_moments=args.bf16_moments, micro_batches=args.micro_batches,
                 ce_chunk=args.ce_chunk, flops_per_step=step_flops, tokens_per_step=tokens)

  def finish(res: dict, n: int, peak: float | None) -> dict:
    if "median_s" in res:
      step_s = res.pop("median_s")
      res.update(step_time_s=step_s, step_time_min_s=res.pop("min_s"),
                 step_time_max_s=res.pop("max_s"), **rates(step_flops, tokens, step_s, n, peak))
    return res

  ref = None
  if args.reference != "none":
    ref = guarded(lambda: torch_train(cfg, args, batch), "torch")
    ref_peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops(ref.get("device", ""))
    ref = finish(ref, 1, ref_peak)
  if args.reference != "torch_only":
    mesh, peak = start_jax(args, summary)
    summary.update(finish(guarded(lambda: jax_train(cfg, args, batch, mesh), "jax"),
                          summary["n_devices"], peak))
    summary["peak_memory_bytes"] = jax_peak_memory(list(mesh.devices.flat))
  return ref


def run_decode(cfg, args, summary: dict) -> dict | None:
  """Time the reference's generation (first) and ours; fills ``summary``, returns the reference's."""
  import numpy as np
  prompts = np.random.default_rng(args.seed).integers(
      3, cfg.vocab_size, size=(args.batch, args.prompt_len)).tolist()
  summary.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
  ref = guarded(lambda: torch_decode(cfg, args, prompts), "torch") if args.reference != "none" else None
  if args.reference != "torch_only":
    mesh, _ = start_jax(args, summary)
    summary.update(guarded(lambda: jax_decode(cfg, args, prompts, mesh), "jax"))
    summary["peak_memory_bytes"] = jax_peak_memory(list(mesh.devices.flat))
  return ref


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  if args.batch < 1 or args.micro_batches < 1 or args.batch % args.micro_batches:
    raise app.UsageError(f"--batch {args.batch} must be a positive multiple of --micro_batches "
                         f"{args.micro_batches}")
  if args.steps < 1 or args.warmup < 0:
    raise app.UsageError(f"need --steps >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
  added_flags = configure_xla(args.xla_flags, args.xla_extra, args.mem_fraction)
  cfg = model_config(args.preset, args.layers, remat_policy=args.remat, attention_impl=args.attention,
                     param_dtype=args.param_dtype, compute_dtype=args.compute_dtype)
  longest = args.seq if args.task == "train" else args.prompt_len + args.new_tokens
  cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, longest))
  summary: dict[str, Any] = {
      "task": args.task, "model": f"{args.preset} x{cfg.n_layers} layers", "preset": args.preset,
      "layers": cfg.n_layers, "params": cfg.num_params(), "batch": args.batch,
      "attention": args.attention, "remat": args.remat, "param_dtype": args.param_dtype,
      "compute_dtype": args.compute_dtype, "platform": None, "device": None, "n_devices": None,
      "mesh": args.mesh, "xla_flags": added_flags, "peak_tflops": None,
      "command": " ".join(["python -m astrollama_jax.bench"] + sys.argv[1:]),
  }
  ref = (run_train if args.task == "train" else run_decode)(cfg, args, summary)
  mem = summary.pop("peak_memory_bytes", None)
  summary["peak_memory_gb"] = None if mem is None else mem / 2 ** 30
  if ref is not None:
    summary["reference"] = ref
    summary["device"] = summary["device"] or ref.get("device")
    if summary.get("tokens_per_s") and ref.get("tokens_per_s"):
      summary["speedup_vs_reference"] = summary["tokens_per_s"] / ref["tokens_per_s"]
  summary["versions"] = versions()
  print_table(summary)
  line = json.dumps(summary)
  if args.out:
    with open(args.out, "a") as f:
      f.write(line + "\n")
  print(line, flush=True)
  if "error" in summary or (ref and "error" in ref):
    sys.exit(3)


if __name__ == "__main__":
  define_flags()
  app.run(main)
