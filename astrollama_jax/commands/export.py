"""``python -m astrollama_jax export``: any checkpoint -> an HF folder ready for the hub.

  python -m astrollama_jax export --checkpoint=runs/sft [--dtype=bfloat16] \
      --output=hf/astrollama-chat

``--checkpoint`` is a converted DIR, a training WORKDIR (its latest complete step), one step
folder ``WORKDIR/checkpoints/<step>`` or an HF folder. Only the ``params`` item of a training
step is read; the optimizer state stays on disk. The output holds sharded safetensors with an
index, ``config.json``, ``generation_config.json`` and the tokenizer files (``tokenizer.model``,
``tokenizer.json``, ``tokenizer_config.json`` with the chat template the checkpoint records or
``--chat_template`` names, ``special_tokens_map.json``), so ``AutoTokenizer`` and
``LlamaForCausalLM.from_pretrained`` load it offline. The folder appears atomically
(``formats.hf.save_hf``).

Memory: nothing is restored up front (no accelerator needed). Each HF tensor is read from the
Orbax checkpoint alone (one layer of a stacked parameter: ``loader.load_model(lazy=True)``), cast,
transposed and written into its planned safetensors shard (``formats.hf.save_hf``), then
dropped, so host memory is bounded by a few copies of the largest tensor, not by the model
or ``--max_shard_gb``; see docs/benchmarks.md. An HF folder as input streams the same way.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import app, flags, logging
import numpy as np
from tqdm import tqdm

from astrollama_jax.checkpoints import layout, loader, locate, lora_base
from astrollama_jax.commands import cli
from astrollama_jax.data import chat_templates
from astrollama_jax.formats import hf, hf_tokenizer, mapping, peft
from astrollama_jax.perf import memory
from astrollama_jax.util import diskspace, tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags exist only when run as a command, so importing this module defines none."""
  cli.define(
    "checkpoint",
    "output",
    "tokenizer",
    "chat_template",
    help={
      "output": "HF folder to create (must not exist or be empty).",
      "tokenizer": "tokenizer.model to ship (default: the checkpoint's).",
      "chat_template": "Chat template to ship (default: the one the checkpoint records, "
      "else llama2).",
    },
  )
  # Not cli's enum --dtype: check_dtype's message names the dtypes the same way everywhere.
  flags.DEFINE_string(
    "dtype", None, "float32, bfloat16 or float16 (default: the checkpoint's dtype)."
  )
  flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors file, GiB.")
  flags.DEFINE_string(
    "peft_adapter",
    None,
    "LoRA workdir: also write its adapters to this folder "
    "as a peft adapter (adapter_config.json, adapter_model.safetensors).",
  )


def export(
  checkpoint: str,
  output: str,
  dtype: str | None = None,
  tokenizer: str | None = None,
  max_shard_bytes: int = 2 * 1024**3,
  show_progress: bool = True,
  peft_adapter: str | None = None,
  chat_template: str | None = None,
) -> dict[str, Any]:
  """Write the HF folder ``output`` from ``checkpoint``; returns the summary dict.

  A LoRA workdir exports merged (its base with ``W + (alpha / rank) * A @ B``); with
  ``peft_adapter`` its adapters are also written there as a peft adapter folder. The tokenizer
  files carry ``chat_template`` (a name in ``chat_templates.TEMPLATES``), by default the one the
  checkpoint records, else its tokenizer's family's.
  """

  t0 = time.monotonic()
  dtype = layout.check_dtype(dtype)
  out = os.path.abspath(output)
  if os.path.exists(out) and os.listdir(out):  # fail before the (long) restore
    raise FileExistsError(f"output {out} exists and is not empty; choose another or remove it")
  kind, root, params_dir, step = locate.locate(checkpoint)
  recorded = loader.recorded_chat_template(checkpoint)
  if chat_template:
    chat_templates.get(chat_template)  # an unknown name fails before the restore
  record = lora_base.read(root) if kind in ("workdir", "step") else None
  if peft_adapter and record is None:
    raise ValueError(
      f"--peft_adapter: {checkpoint} is not a LoRA workdir (no {lora_base.LORA_FILE})"
    )
  if kind != "hf":  # the size follows from the config (its param_dtype is the stored one): refuse
    stored = locate.read_model_config(root)  # before the (long) restore; save_hf checks again
    diskspace.check_free_space(
      out, stored.num_params() * np.dtype(dtype or stored.param_dtype).itemsize, "the output folder"
    )
  loaded = loader.load_model(
    checkpoint, dtype=dtype, tokenizer=tokenizer, need_tokenizer=True, lazy=True
  )
  loaded.open_tokenizer()  # it must fit the model's vocabulary
  cfg, tok_path = loaded.cfg, loaded.tokenizer_path
  template = chat_templates.choose(chat_template, recorded=recorded, tokenizer=tok_path)
  logging.info(
    "exporting %s (%s%s) -> %s: %s",
    checkpoint,
    kind,
    f" step {step}" if step is not None else "",
    out,
    cfg,
  )

  bar = tqdm(
    total=mapping.num_tensors(cfg), unit="tensor", disable=not show_progress, desc="export"
  )

  def progress(name, arr):
    bar.set_postfix_str(f"{name} {list(arr.shape)}", refresh=False)
    bar.update()

  try:
    written = hf.save_hf(
      cfg,
      loaded.params,
      out,
      max_shard_bytes=max_shard_bytes,
      progress=progress,
      extra_files=lambda d: hf_tokenizer.write_tokenizer_folder(
        d, tok_path, cfg.max_seq_len, template
      ),
    )
  finally:
    bar.close()
  adapter = None
  if peft_adapter:
    with diskspace.atomic_directory(peft_adapter) as tmp:
      peft.save_adapter(
        tmp, record["spec"], lora_base.restore_adapters(params_dir), record["base"].get("path", "")
      )
    adapter = os.path.abspath(peft_adapter)
  return {
    "peft_adapter": adapter,
    "checkpoint": os.path.abspath(checkpoint),
    "kind": kind,
    "chat_template": template.name,
    "step": step,
    "output": out,
    "dtype": cfg.param_dtype,
    "tensors": written["tensors"],
    "parameters": written["parameters"],
    "bytes": written["bytes"],
    "shards": written["shards"],
    "seconds": round(time.monotonic() - t0, 2),
    "peak_rss_bytes": memory.own_peak_rss_bytes(),
  }


def main(argv):
  del argv
  for name in ("checkpoint", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  summary = export(
    FLAGS.checkpoint,
    FLAGS.output,
    FLAGS.dtype,
    FLAGS.tokenizer,
    int(FLAGS.max_shard_gb * 1024**3),
    peft_adapter=FLAGS.peft_adapter,
    chat_template=FLAGS.chat_template,
  )
  tables.report(f"exported {summary['checkpoint']} -> {summary['output']}", summary)
