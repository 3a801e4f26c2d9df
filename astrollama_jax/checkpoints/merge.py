"""Weighted merges of checkpoints of one architecture, streamed one tensor at a time.

Two recipes over models ``m_1..m_n`` with weights ``w_1..w_n``:

* a plain average ``sum w_i m_i`` (the weights must sum to one: anything else rescales every
  weight of the model, which is never what a merge means);
* task arithmetic over a base ``b``: ``b + sum w_i (m_i - b)`` (any weights: each ``m_i - b``
  is one fine-tune's "task vector").

AstroSage's recipe ends with the first: its fine-tuned model 75%, Meta's Instruct model 25%.

Every input is opened with ``loader.load_model(lazy=True)`` (HF folders, converted DIRs,
workdirs and step folders stay on disk; a LoRA workdir is its base with the adapters merged in,
held on the host), and every output tensor is made from the inputs' same tensor alone, in
float32, then cast to the output dtype: one layer of one parameter at a time for an HF folder,
one stacked parameter for our format (``writer.write_params`` saves whole parameters). So host
memory holds a few tensors, never a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
import os
import time
from typing import Any

from absl import logging
import numpy as np

from astrollama_jax.checkpoints import layout, loader, locate, writer
from astrollama_jax.checkpoints.loader import LoadedModel
from astrollama_jax.data import chat_templates
from astrollama_jax.errors import UserError
from astrollama_jax.formats import hf, hf_tokenizer, mapping
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.perf import memory
from astrollama_jax.util import diskspace

FORMATS = ("ours", "hf")
# The config fields that decide every parameter's shape: inputs must agree on all of them.
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


def check_weights(weights: Sequence[float], n_models: int, task_arithmetic: bool) -> list[float]:
  """The weights as floats, after checking there is one per model and, for a plain average,
  that they sum to one."""
  weights = [float(w) for w in weights]
  if len(weights) != n_models:
    raise UserError(f"{len(weights)} weights for {n_models} checkpoints; give one weight each")
  if not all(math.isfinite(w) for w in weights):
    raise UserError(f"weights {weights} must be finite numbers")
  total = math.fsum(weights)
  if not task_arithmetic and abs(total - 1.0) > 1e-6:
    raise UserError(
      f"weights {','.join(f'{w:g}' for w in weights)} sum to {total:g}, not 1: an average "
      "needs weights summing to one (for task arithmetic over a base, pass --base)"
    )
  return weights


def check_same_architecture(models: Sequence[LoadedModel]) -> None:
  """Refuse inputs whose configs give any parameter another shape; warn on other differences."""
  first = models[0]
  for other in models[1:]:
    for field in SHAPE_FIELDS:
      a, b = getattr(first.cfg, field), getattr(other.cfg, field)
      if a != b:
        raise UserError(
          f"{other.checkpoint} is another architecture than {first.checkpoint}: "
          f"{field} is {b}, not {a}"
        )
    for field in ("rope_theta", "norm_eps", "max_seq_len"):
      a, b = getattr(first.cfg, field, None), getattr(other.cfg, field, None)
      if a != b:
        logging.warning(
          "%s has %s=%s, %s has %s: the output keeps the first's",
          other.checkpoint, field, b, first.checkpoint, a,
        )  # fmt: skip


class MergedArray(mapping.LazyArray):
  """One merged parameter, computed when read: ``x[i]`` merges layer ``i`` alone.

  The same contract as ``reader.StoredArray`` (``shape``, ``dtype``, ``x[i]``, ``np.asarray``),
  so ``hf.save_hf`` streams it like any lazy parameter.
  """

  def __init__(
    self,
    sources: Sequence[Any],
    weights: Sequence[float],
    base: Any | None,
    per_layer: bool,
    dtype: str,
  ):
    self._sources, self._base, self._per_layer = list(sources), base, per_layer
    self._weights = [np.float32(w) for w in weights]
    self.shape, self.dtype = tuple(sources[0].shape), np.dtype(dtype)

  def _merge(self, index: Any) -> np.ndarray:
    """The merged slice ``index`` of every input, in float32 arithmetic, cast to ``dtype``."""
    read = lambda x: np.asarray(x[index], dtype=np.float32)
    # One scratch buffer for every term: an input's slice may be a view of a host-held input
    # (a LoRA workdir's merged model), never written to; w * x and w * (x - b) are the same
    # products whether or not they land in a buffer.
    sources, weights = iter(self._sources), iter(self._weights)
    if self._base is None:
      acc = np.multiply(read(next(sources)), next(weights))
      scratch = np.empty_like(acc)
      for x, w in zip(sources, weights):
        acc += np.multiply(read(x), w, out=scratch)
    else:
      base = read(self._base)
      acc, scratch = np.array(base, copy=True), np.empty_like(base)
      for x, w in zip(sources, weights):
        np.subtract(read(x), base, out=scratch)
        acc += np.multiply(scratch, w, out=scratch)
    return acc.astype(self.dtype, copy=False)

  def __getitem__(self, index: Any) -> np.ndarray:
    if self._per_layer and isinstance(index, (int, np.integer)):
      return self._merge(int(index))
    return np.asarray(self)[index]

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    if self._per_layer:
      out = np.empty(self.shape, self.dtype)
      for i in range(self.shape[0]):
        out[i] = self._merge(i)
    else:
      out = self._merge(Ellipsis)
    return out if dtype is None else out.astype(dtype)


def merged_params(
  cfg: LlamaConfig,
  inputs: Sequence[dict[str, Any]],
  weights: Sequence[float],
  base: dict[str, Any] | None,
  dtype: str,
) -> dict[str, Any]:
  """The parameter tree of ``MergedArray``s over the inputs' (lazy) parameter trees."""
  out: dict[str, Any] = {}
  for entry in mapping.table(cfg):
    sources = [mapping.get_path(p, entry.path) for p in inputs]
    over = mapping.get_path(base, entry.path) if base is not None else None
    leaf = MergedArray(sources, weights, over, entry.per_layer, dtype)
    mapping.set_path(out, entry.path, leaf)
  return out


def _check_output(output: str, paths: Sequence[str]) -> str:
  """The output's absolute path, refused when it is not empty or is (inside) an input."""
  out = os.path.realpath(output)
  for path in paths:
    src = os.path.realpath(path)
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
      raise UserError(f"output {output} is the input {path} (or inside it); choose another")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"output {output} exists and is not empty; choose another or remove it")
  return os.path.abspath(output)


def merge(
  checkpoints: Sequence[str],
  output: str,
  weights: Sequence[float] | None = None,
  base: str | None = None,
  fmt: str = "ours",
  dtype: str | None = None,
  tokenizer: str | None = None,
  chat_template: str | None = None,
  max_shard_bytes: int = 2 * 1024**3,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, Any]:
  """Merge ``checkpoints`` (with ``weights``, default equal) into ``output``; returns a summary.

  With ``base`` it is task arithmetic over that base, else a plain average. ``fmt`` is "ours"
  (a converted DIR) or "hf" (an HF folder with the first model's tokenizer and chat template,
  or ``tokenizer``/``chat_template``). ``dtype`` defaults to the first model's stored dtype.
  """
  t0 = time.monotonic()
  if not checkpoints:
    raise UserError("no checkpoints to merge; pass --checkpoint once per model")
  if fmt not in FORMATS:
    raise UserError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
  n = len(checkpoints)
  weights = check_weights([1.0 / n] * n if weights is None else weights, n, base is not None)
  dtype = layout.check_dtype(dtype)
  out = _check_output(output, [*checkpoints, *([base] if base else [])])
  for path in [*checkpoints, *([base] if base else [])]:
    locate.locate(path)  # a missing or unknown input fails before anything is read
  models = [
    loader.load_model(path, lazy=True, tokenizer=tokenizer if i == 0 else None)
    for i, path in enumerate(checkpoints)
  ]
  base_model = loader.load_model(base, lazy=True) if base else None
  check_same_architecture(models + ([base_model] if base_model else []))
  first = models[0]
  dtype = dtype or first.cfg.param_dtype
  cfg = first.cfg.replace(param_dtype=dtype)
  params = merged_params(
    cfg, [m.params for m in models], weights, base_model.params if base_model else None, dtype
  )
  logging.info(
    "merging %s with weights %s%s -> %s (%s, %s)",
    list(checkpoints), weights, f" over the base {base}" if base else "", out, fmt, dtype,
  )  # fmt: skip
  if fmt == "hf":
    first.open_tokenizer()  # there must be one, and it must fit the model
    tok_path = first.tokenizer_path
    template = chat_templates.choose(
      chat_template, recorded=loader.recorded_chat_template(checkpoints[0]), tokenizer=tok_path
    )
    written = hf.save_hf(
      cfg,
      params,
      out,
      max_shard_bytes=max_shard_bytes,
      progress=progress,
      extra_files=lambda d: hf_tokenizer.write_tokenizer_folder(
        d, tok_path, cfg.max_seq_len, template
      ),
    )
  else:
    diskspace.check_free_space(
      out, cfg.num_params() * np.dtype(dtype).itemsize, "the output folder"
    )

    def stream():
      for entry in mapping.table(cfg):
        arr = np.asarray(mapping.get_path(params, entry.path))
        if progress:
          progress("/".join(entry.path), arr)
        yield entry.path, arr
        del arr

    written = writer.write_params(out, cfg, stream(), first.tokenizer_path)
  return {
    "checkpoints": [os.path.abspath(p) for p in checkpoints],
    "weights": weights,
    "base": os.path.abspath(base) if base else None,
    "recipe": "task arithmetic" if base else "average",
    "output": out,
    "format": fmt,
    "dtype": dtype,
    "parameters": written["parameters"],
    "bytes": written["bytes"],
    "seconds": round(time.monotonic() - t0, 2),
    "peak_rss_bytes": memory.own_peak_rss_bytes(),
  }
