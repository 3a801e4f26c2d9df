"""Meta's LLaMA-2 and LLaMA 3 downloads (params.json, consolidated.NN.pth) -> our parameters.

Meta saves one file per model-parallel rank (1 for 7B/8B, 2 for 13B, 8 for 70B). Each tensor is
either column-parallel (output rows split: wq/wk/wv, w1/w3, output), row-parallel (input columns
split: wo, w2), split for the embedding (LLaMA-2 on its dimension, LLaMA 3 on its vocabulary: read
off the shard shapes) or replicated (norms), so merging is a concatenation along one axis.

LLaMA 3's ``params.json`` names its vocabulary (LLaMA-2's says -1) and ``rope_theta``; 3.1 and
later set ``use_scaled_rope`` but not the scaling's numbers, which Meta's reference code fixes
(factor 8, low/high frequency factors 1 and 4, 8,192 original positions) and which 3.2's tied
1B/3B models raise to factor 32 (as their Hugging Face configs say); ``rope_scaling_factor`` or
``high_freq_factor`` in ``params.json`` take precedence. A download without ``output.weight``, or
whose ``output.weight`` is its embedding table, has tied embeddings (3.2 1B/3B).

Meta's q/k rows are in interleaved-pair rotary order; our model (like HF) uses the half-split
order, so q/k get HF's permutation here. Past that, Meta's [out, in] matrices are exactly HF's,
and the shared table (``formats.mapping``) finishes the job: this module only says how to fetch
each HF tensor from the shards; one reshape table, one stacking loop, one rotary convention.

Memory: the shard files are memory-mapped (``torch.load(mmap=True)``) and re-opened per output
parameter; each source tensor's pages are released as soon as it is copied into the stacked
parameter, so host memory holds one stacked parameter plus one layer's source tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import ctypes
import json
import math
import mmap
import os
import re
from typing import Any

from absl import logging
import numpy as np

from astrollama_jax.formats import mapping
from astrollama_jax.formats.mapping import ConversionError
from astrollama_jax.model.config import LlamaConfig

# HF name -> (Meta name, merge axis across shards or None if replicated, q/k head count field).
_META_NAMES: dict[str, tuple[str, int | None, str | None]] = {
  "model.embed_tokens.weight": ("tok_embeddings.weight", 1, None),
  "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.attention.wq.weight", 0, "n_heads"),
  "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.attention.wk.weight", 0, "n_kv_heads"),
  "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.attention.wv.weight", 0, None),
  "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.attention.wo.weight", 1, None),
  "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w1.weight", 0, None),
  "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w3.weight", 0, None),
  "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight", 1, None),
  "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None, None),
  "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None, None),
  "model.norm.weight": ("norm.weight", None, None),
  "lm_head.weight": ("output.weight", 0, None),
}
_EMBED = "tok_embeddings.weight"
_IGNORED = ("rope.freqs",)
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


def _torch():
  try:
    import torch
  except ImportError as e:  # torch is only needed for Meta's .pth files
    raise ImportError(
      "reading Meta's consolidated.*.pth files needs PyTorch; install the CPU wheel "
      "with `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`"
    ) from e
  return torch


# --- params.json -> LlamaConfig ------------------------------------------------------------------


def ffn_dim_from_params(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """Meta's FeedForward hidden size: 2/3 of 4*dim, scaled, rounded up to ``multiple_of``."""
  hidden = int(2 * 4 * dim / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * math.ceil(hidden / multiple_of)


def read_params_json(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "params.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no params.json in {folder}: not a Meta LLaMA checkpoint folder")
  try:
    with open(path) as f:
      p = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from e
  missing = [k for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps") if k not in p]
  if missing:
    raise ConversionError(f"{path} lacks {missing}")
  sizes = [k for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of") if k in p]
  bad = [f"{k}={p[k]!r}" for k in sizes if not _positive_int(p[k], none_ok=k == "n_kv_heads")]
  if not isinstance(p["norm_eps"], (int, float)) or not p["norm_eps"] > 0:
    bad.append(f"norm_eps={p['norm_eps']!r}")
  if bad:
    raise ConversionError(f"{path}: sizes must be positive numbers: {', '.join(bad)}")
  if not isinstance(p.get("use_scaled_rope", False), bool):
    raise ConversionError(
      f"{path}: use_scaled_rope must be true or false, got {p['use_scaled_rope']!r}"
    )
  for k in ("rope_theta", "rope_scaling_factor", "high_freq_factor", "low_freq_factor"):
    v = p.get(k)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
      raise ConversionError(f"{path}: {k} must be a positive number, got {v!r}")
  return p


def _positive_int(v: Any, none_ok: bool = False) -> bool:
  if v is None:
    return none_ok
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def config_from_params(
  p: dict[str, Any], vocab_size: int | None = None, tied: bool = False, **overrides: Any
) -> LlamaConfig:
  """LlamaConfig from ``params.json``; ``vocab_size`` fills in a ``-1`` there, ``tied`` says
  the download has no output head of its own."""
  vocab = p.get("vocab_size", -1)
  llama3 = vocab is not None and vocab > 0  # LLaMA-2's params.json leaves it to the tokenizer
  if not llama3:
    if vocab_size is None:
      raise ConversionError("params.json has no vocab_size and none was given")
    vocab = vocab_size
  rope: dict[str, Any] = {}
  if p.get("use_scaled_rope"):
    rope = dict(
      rope_scaling="llama3",
      rope_factor=float(p.get("rope_scaling_factor") or (32.0 if tied else 8.0)),
      rope_low_freq_factor=float(p.get("low_freq_factor") or 1.0),
      rope_high_freq_factor=float(p.get("high_freq_factor") or 4.0),
      rope_original_max_seq_len=8192,
    )
  kw = dict(
    vocab_size=int(vocab),
    dim=int(p["dim"]),
    n_layers=int(p["n_layers"]),
    n_heads=int(p["n_heads"]),
    n_kv_heads=int(p.get("n_kv_heads") or p["n_heads"]),
    ffn_dim=ffn_dim_from_params(int(p["dim"]), int(p["multiple_of"]), p.get("ffn_dim_multiplier")),
    norm_eps=float(p["norm_eps"]),
    rope_theta=float(p.get("rope_theta") or 10000.0),
    # The context each family was trained for (HF's conversion script uses the same).
    max_seq_len=131072 if rope else 8192 if llama3 else 4096,
    tie_embeddings=tied,
    **rope,
  )
  kw.update(overrides)
  return LlamaConfig(**kw)


# --- shard files -------------------------------------------------------------------------------


def shard_files(folder: str) -> list[str]:
  """``consolidated.00.pth`` ... in rank order; a gap in the numbering is a missing shard."""
  found = {}
  for fn in os.listdir(folder):
    m = _SHARD_RE.match(fn)
    if m:
      found[int(m.group(1))] = os.path.join(folder, fn)
  if not found:
    raise FileNotFoundError(f"no consolidated.NN.pth files in {folder}")
  missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
  if missing:
    raise ConversionError(
      f"{folder}: model-parallel shards {missing} are missing "
      f"(found {[os.path.basename(found[i]) for i in sorted(found)]})"
    )
  return [found[i] for i in sorted(found)]


@contextlib.contextmanager
def open_shards(files: list[str]) -> Iterator[list[dict[str, Any]]]:
  """Memory-map every shard's state dict; the mappings go away when the block ends."""
  torch = _torch()
  dicts = []
  try:
    for fn in files:
      try:
        dicts.append(torch.load(fn, map_location="cpu", mmap=True, weights_only=True))
      except Exception as e:  # truncated zip, not a torch file, pickled code ...
        raise ConversionError(
          f"cannot read Meta shard {fn} (truncated or not a torch checkpoint?): "
          f"{type(e).__name__}: {e}"
        ) from e
    yield dicts
  finally:
    dicts.clear()


def _to_numpy(t: Any, name: str, fn: str) -> np.ndarray:
  """A zero-copy numpy view of a CPU tensor (bfloat16 through its bit pattern)."""
  torch = _torch()
  if not isinstance(t, torch.Tensor):
    raise ConversionError(f"{fn}: entry {name!r} is a {type(t).__name__}, not a tensor")
  if t.dtype == torch.bfloat16:
    import ml_dtypes

    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if t.dtype not in (torch.float16, torch.float32):
    raise ConversionError(f"{fn}: tensor {name!r} has dtype {t.dtype}, expected a floating dtype")
  return t.contiguous().numpy()


def _drop_pages(tensors: list[Any]) -> None:
  """Tell the kernel we are done with these memory-mapped tensors (``MADV_DONTNEED``).

  The shard mappings stay open while one output parameter is built from all layers; without
  this, every page read stays resident and RSS grows by the parameter's source size. The
  mappings are private and read-only here, so dropped pages would simply be re-read from the
  file if touched again (they are not). Only whole pages inside each tensor are dropped.
  """
  libc = _libc()
  if libc is None:
    return
  page = mmap.PAGESIZE
  for t in tensors:
    start, size = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, (start + size) // page * page
    if hi > lo:
      libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


_MADV_DONTNEED = 4


def _libc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
  except (OSError, AttributeError):  # not Linux/glibc: pages are only reclaimed under pressure
    return None


def _interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Meta's rotary row order (pairs interleaved) -> HF's (first halves, then second halves)."""
  rows, cols = w.shape
  hd = rows // n_heads
  return w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _merge(
  parts: list[np.ndarray], axis: int | None, name: str, files: list[str], expected: tuple[int, ...]
) -> np.ndarray:
  """Concatenate one tensor's model-parallel pieces, checking every shape against the config."""
  shapes = [tuple(p.shape) for p in parts]
  if axis is None:
    if any(s != tuple(expected) for s in shapes):
      raise ConversionError(
        f"tensor {name!r} (replicated) has shapes {shapes} in "
        f"{[os.path.basename(f) for f in files]}; params.json implies {tuple(expected)}"
      )
    return parts[0]
  merged = list(shapes[0])
  merged[axis] = sum(s[axis] for s in shapes)
  if len(set(shapes)) != 1 or tuple(merged) != tuple(expected):
    raise ConversionError(
      f"tensor {name!r}: the {len(files)} model-parallel shard(s) "
      f"{[os.path.basename(f) for f in files]} "
      f"in {os.path.dirname(files[0])} have shapes {shapes}; merged on dim {axis} that is "
      f"{tuple(merged)}, but params.json implies {tuple(expected)} (a missing shard, or a "
      f"params.json that does not match the weights?)"
    )
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def iter_meta_params(
  folder: str,
  cfg: LlamaConfig,
  dtype: str | None = None,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yield (our path, stacked numpy array) one parameter at a time from Meta shards.

  ``progress(hf_name, merged)`` is called for every merged source tensor.
  """
  files = shard_files(folder)
  checked = False

  def read(entry: mapping.Tensor, expected: tuple[int, ...]) -> Iterator[np.ndarray]:
    nonlocal checked
    meta_template, axis, heads_field = _META_NAMES[entry.hf_name]
    with open_shards(files) as dicts:  # re-opened per parameter: its mapped pages go with it
      if not checked:
        for fn, d in zip(files, dicts):
          _check_names(fn, d, cfg)
        checked = True
      for i in range(cfg.n_layers if entry.per_layer else 1):
        name = meta_template.format(i=i)
        parts, sources = [], []
        for fn, d in zip(files, dicts):
          if name not in d:
            raise ConversionError(
              f"{fn}: tensor {name!r} is missing (params.json has n_layers={cfg.n_layers})"
            )
          sources.append(d[name])
          parts.append(_to_numpy(d[name], name, fn))
        if name == _EMBED:
          axis = _embedding_axis(parts, expected)
        w = _merge(parts, axis, name, files, expected)  # Meta's [out, in] == HF's
        del parts
        if heads_field:
          w = _interleaved_to_half_split(w, getattr(cfg, heads_field))
        yield w
        del w
        _drop_pages(sources)  # copied into the stacked parameter: let go of its mapped pages now

  return mapping.stack_params(cfg, read, dtype, progress)


def _embedding_axis(parts: list[np.ndarray], expected: tuple[int, ...]) -> int:
  """LLaMA 3 splits the embedding on the vocabulary (0), LLaMA-2 on the dimension (1); with
  several shards only one of the two gives the expected shape."""
  return 0 if len(parts) > 1 and all(p.shape[1:] == tuple(expected[1:]) for p in parts) else 1


def _check_names(fn: str, state: dict[str, Any], cfg: LlamaConfig) -> None:
  """Layers beyond params.json's n_layers are an error (a mismatched params.json would silently
  drop them); other unknown tensors are only reported."""
  unknown = []
  for name in state:
    if name in _IGNORED:
      continue
    m = re.fullmatch(r"layers\.(\d+)\..+", name)
    if m and int(m.group(1)) >= cfg.n_layers:
      raise ConversionError(
        f"{fn}: tensor {name!r} belongs to layer {m.group(1)} but params.json has "
        f"n_layers={cfg.n_layers}"
      )
    if not any(
      re.fullmatch(re.escape(t).replace(r"\{i\}", r"\d+"), name) for t, _, _ in _META_NAMES.values()
    ):
      unknown.append(name)
  if unknown:
    logging.warning(
      "%s: ignoring %d tensors that are not LLaMA's: %s", fn, len(unknown), sorted(unknown)[:5]
    )


def read_meta_config(folder: str, dtype: str | None = None) -> LlamaConfig:
  """The model config of a Meta folder; a ``vocab_size`` of -1 is read off ``tok_embeddings``."""
  p = read_params_json(folder)
  files = shard_files(folder)
  with open_shards(files[:1]) as (d,):
    emb = d.get(_EMBED)
    if emb is None:
      raise ConversionError(f"{files[0]}: tensor {_EMBED!r} is missing")
    # LLaMA-2 splits the embedding's columns over the shards, so its rows are the vocabulary.
    vocab, src_dtype = int(emb.shape[0]), str(emb.dtype).replace("torch.", "")
    out = d.get("output.weight")
    tied = out is None or (len(files) == 1 and out.shape == emb.shape and bool((out == emb).all()))
  try:
    return config_from_params(p, vocab, tied, param_dtype=dtype or src_dtype)
  except ConversionError:
    raise
  except ValueError as e:
    raise ConversionError(f"{folder}/params.json does not describe a valid LLaMA: {e}") from e
