"""``python -m astrollama_jax merge``: a weighted average (or task arithmetic) of checkpoints.

  # AstroSage's last step: the fine-tuned model 75%, Meta's Instruct model 25%
  python -m astrollama_jax merge --checkpoint=runs/sft --checkpoint=hf/Llama-3.1-8B-Instruct \
      --weights=0.75,0.25 --format=hf --dtype=bfloat16 --output=hf/astrosage-merged

  # task arithmetic: base + sum w_i (model_i - base)
  python -m astrollama_jax merge --base=hf/Llama-3.1-8B --checkpoint=runs/cpt \
      --checkpoint=hf/Llama-3.1-8B-Instruct --weights=1,1 --output=merged

Each ``--checkpoint`` (and ``--base``) is anything the loader reads: an HF folder, a converted
DIR, a training WORKDIR or step folder, a LoRA workdir (merged into its base first). All must
share one architecture. Tensors are merged one at a time in float32 (``checkpoints/merge.py``).
"""

from __future__ import annotations

from absl import app, flags
from tqdm import tqdm

from astrollama_jax.checkpoints import merge
from astrollama_jax.commands import cli
from astrollama_jax.errors import UserError
from astrollama_jax.util import tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags exist only when run as a command, so importing this module defines none."""
  flags.DEFINE_multi_string(
    "checkpoint", None, "A model to merge; once per model, in the order of --weights."
  )
  flags.DEFINE_list(
    "weights", None, "One weight per --checkpoint, e.g. 0.75,0.25 (default: equal weights)."
  )
  flags.DEFINE_string(
    "base", None, "Task arithmetic over this model: base + sum w_i (checkpoint_i - base)."
  )
  flags.DEFINE_enum(
    "format", "ours", merge.FORMATS, "ours: a converted DIR; hf: an HF folder with tokenizer."
  )
  flags.DEFINE_string(
    "dtype", None, "float32, bfloat16 or float16 (default: the first checkpoint's dtype)."
  )
  flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors file, GiB (--format=hf).")
  cli.define(
    "output",
    "tokenizer",
    "chat_template",
    help={
      "output": "Folder to create (must not exist or be empty).",
      "tokenizer": "tokenizer.model to ship (default: the first checkpoint's).",
      "chat_template": "Chat template to ship with --format=hf (default: the one the first "
      "checkpoint records, else llama2).",
    },
  )


def _weights(values: list[str] | None) -> list[float] | None:
  if values is None:
    return None
  try:
    return [float(v) for v in values]
  except ValueError:
    raise UserError(f"--weights={','.join(values)} must be numbers, e.g. 0.75,0.25") from None


def main(argv):
  cli.no_extra_args(argv)
  for name in ("checkpoint", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  bar = tqdm(unit="tensor", desc="merge")

  def progress(name, arr):
    bar.set_postfix_str(f"{name} {list(arr.shape)}", refresh=False)
    bar.update()

  try:
    summary = merge.merge(
      FLAGS.checkpoint,
      FLAGS.output,
      weights=_weights(FLAGS.weights),
      base=FLAGS.base,
      fmt=FLAGS.format,
      dtype=FLAGS.dtype,
      tokenizer=FLAGS.tokenizer,
      chat_template=FLAGS.chat_template,
      max_shard_bytes=int(FLAGS.max_shard_gb * 1024**3),
      progress=progress,
    )
  finally:
    bar.close()
  tables.report(f"merged {len(summary['checkpoints'])} checkpoints -> {summary['output']}", summary)
