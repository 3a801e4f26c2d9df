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
  a number for training. FLOPs come from ``perf.flops`` (MaxText's counting), so MFU can be
  set beside MaxText's published figures.
* Step time is the median over timed steps after warm-up (the first call compiles), each step
  synchronised with ``jax.block_until_ready``; TFLOP/s are per device, MFU against the device's
  dense bf16 peak (``perf.timing``).
* XLA GPU flags and the memory fraction are only read when JAX creates its backend, so they are
  set in the environment before anything touches a device (``perf.bench_jax.configure_xla``).
* ``--reference=torch`` runs the same shapes with transformers' ``LlamaForCausalLM`` (SDPA
  attention) in the same process, *before* JAX claims the GPU memory (``perf.bench_torch``). It
  computes as the JAX side does on every device (``reference_settings``): master weights in
  ``model.param_dtype``, autocast to ``model.compute_dtype``, fused AdamW where torch has it,
  per-layer checkpointing where the config rematerialises; decoding runs both sides on the same
  weights and compares their greedy tokens. The tokens/s ratio is reported only when the two
  sides match (``mismatches``): a ratio against a handicapped reference says nothing.
  ``torch_only`` runs just that side (should the two CUDA stacks not share a process).

The run itself is ``perf.bench.run``; this module holds the flags and the wiring.
Prints a table and, last, one JSON line; ``--output`` appends that line to a file (the GPU sweep).
"""

from __future__ import annotations

import json
import sys

from absl import flags

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


def main(argv: list[str]) -> None:
  from astrollama_jax.commands import cli
  from astrollama_jax.perf import bench, bench_jax, bench_report, timing

  cli.no_extra_args(argv)
  if FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise UserError(f"need --steps >= 1 and --warmup >= 0, got {FLAGS.steps}, {FLAGS.warmup}")
  options = timing.Options(
    task=FLAGS.task,
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    prompt_len=FLAGS.prompt_len,
    new_tokens=FLAGS.new_tokens,
    reference=FLAGS.reference,
    peak_tflops=FLAGS.peak_tflops,
    matmul_probe=FLAGS.matmul_probe,
  )
  added_flags = bench_jax.configure_xla(FLAGS.xla_flags, FLAGS.xla_extra, FLAGS.mem_fraction)
  command = " ".join(["python -m astrollama_jax bench"] + sys.argv[1:])
  summary = bench.run(FLAGS.config, options, added_flags, command)
  bench_report.report(summary)
  if FLAGS.output:
    with open(FLAGS.output, "a") as f:
      f.write(json.dumps(tables.jsonable(summary), ensure_ascii=False) + "\n")
  ref = summary.get("reference")
  if "error" in summary or (ref and "error" in ref):
    sys.exit(3)
