"""``python -m astrollama_jax convert``: Meta or HF LLaMA-2/LLaMA 3 weights -> a converted DIR.

  python -m astrollama_jax convert --source_format=meta --source=llama-2-70b --output=ckpt/70b \\
      [--dtype=bfloat16] [--tokenizer=llama/tokenizer.model]

Writes DIR/model_config.json, the tokenizer and DIR/params (Orbax), one parameter at a
time (``checkpoints.writer.write_params``; see there for the memory bound), shows progress per
source tensor and ends with a summary table and one JSON line.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np
from tqdm import tqdm

from astrollama_jax.checkpoints import layout, writer
from astrollama_jax.commands import cli
from astrollama_jax.formats import hf, mapping, meta
from astrollama_jax.perf import memory
from astrollama_jax.util import diskspace, tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags exist only when run as a command, so importing this module defines none."""
  flags.DEFINE_enum(
    "source_format", None, ["meta", "hf"], "Meta consolidated.*.pth folder or HF folder."
  )
  flags.DEFINE_string("source", None, "Folder with the source weights.")
  # Not cli's enum --dtype: check_dtype's message names the dtypes the same way everywhere.
  flags.DEFINE_string(
    "dtype", None, "Parameter dtype: float32, bfloat16 or float16 (default: as stored)."
  )
  cli.define(
    "output",
    "tokenizer",
    help={
      "output": "Converted DIR to create (must not exist or be empty).",
      "tokenizer": "tokenizer.model or tokenizer.json (default: in --source or its parent).",
    },
  )


def find_tokenizer(source: str, explicit: str | None = None) -> str:
  """The tokenizer: given, in the source folder, or beside it (Meta's LLaMA-2 download layout).

  A folder's ``tokenizer.model`` (SentencePiece or Meta's tiktoken ranks) or ``tokenizer.json``
  (an HF folder's), as ``data.tokenizer.detect`` reads them."""
  if explicit:
    if not os.path.isfile(explicit):
      raise FileNotFoundError(f"--tokenizer {explicit} not found")
    return explicit
  folders = [source, os.path.dirname(os.path.abspath(source))]
  for folder in folders:
    found = layout.tokenizer_in(folder)
    if found:
      return found
  raise FileNotFoundError(
    f"no tokenizer.model or tokenizer.json in {' or '.join(folders)}; pass --tokenizer"
  )


def convert(
  source_format: str,
  source: str,
  output: str,
  dtype: str | None = None,
  tokenizer: str | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """Convert ``source`` into the converted DIR ``output``; returns the summary dict."""
  t0 = time.monotonic()
  if jax.process_count() > 1:
    raise RuntimeError("conversion runs in a single process; restore the result onto any mesh")
  dtype = layout.check_dtype(dtype)
  if not os.path.isdir(source):
    raise FileNotFoundError(f"source folder {source} does not exist")
  out = os.path.abspath(output)
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"output {out} exists and is not empty; choose another or remove it")
  tok_path = find_tokenizer(source, tokenizer)
  if source_format == "meta":
    cfg = meta.read_meta_config(source, dtype)
    extra = {"shards": len(meta.shard_files(source))}
  elif source_format == "hf":
    cfg = hf.read_hf_config(source).replace(param_dtype=dtype or hf.stored_dtype(source))
    extra = {}
  else:
    raise ValueError(f"unknown source_format {source_format!r}; use meta or hf")
  from astrollama_jax.data.tokenizer import Tokenizer

  Tokenizer(tok_path).check_vocab(cfg.vocab_size)
  # The size is known before the first tensor is read: refuse now rather than after hours.
  diskspace.check_free_space(
    out, cfg.num_params() * np.dtype(cfg.param_dtype).itemsize, "the output folder"
  )
  logging.info("converting %s (%s) -> %s: %s", source, source_format, out, cfg)

  bar = tqdm(
    total=mapping.num_tensors(cfg), unit="tensor", disable=not show_progress, desc="convert"
  )
  n_source = 0

  def progress(name, arr):
    nonlocal n_source
    n_source += 1
    bar.set_postfix_str(f"{name} {list(arr.shape)}", refresh=False)
    bar.update()

  read = meta.iter_meta_params if source_format == "meta" else hf.iter_hf_params
  try:
    counts = writer.write_params(out, cfg, read(source, cfg, cfg.param_dtype, progress), tok_path)
  finally:
    bar.close()
  return {
    "source_format": source_format,
    "source": os.path.abspath(source),
    "output": out,
    "dtype": cfg.param_dtype,
    "tensors": n_source,
    **counts,
    **extra,
    "seconds": round(time.monotonic() - t0, 2),
    "peak_rss_bytes": memory.own_peak_rss_bytes(),
  }


def main(argv):
  del argv
  for name in ("source_format", "source", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  summary = convert(FLAGS.source_format, FLAGS.source, FLAGS.output, FLAGS.dtype, FLAGS.tokenizer)
  tables.report(f"converted {summary['source']} -> {summary['output']}", summary)
