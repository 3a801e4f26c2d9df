"""Hugging Face ``LlamaForCausalLM`` folders <-> our parameter dicts.

One table (``_MAPPING``) names every tensor on both sides and the reshape between them, and
both directions are read off it, so a round trip is bit-exact by construction. HF stores
linear weights as [out, in]; we store [in, out] with heads split out. HF's q/k rows are
already in the half-split rotary order our model uses, so no permutation happens here.

Tensors are read one at a time from memory-mapped safetensors files and written one
stacked parameter at a time, so host memory holds at most the model once plus one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from safetensors import safe_open
from safetensors.numpy import save_file

from astrollama_jax import diskspace
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]


class ConversionError(ValueError):
  """A weight file does not fit the config: names the tensor and the shapes."""


# (our path, HF name template, HF->ours, ours->HF). Layer tensors use "{i}".
def _mapping(cfg: LlamaConfig):
  d, h, kh, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  T = lambda w: w.T  # noqa: E731
  return [
      (("embed",), "model.embed_tokens.weight", lambda w: w, lambda w: w),
      (("layers", "attn", "q_proj"), "model.layers.{i}.self_attn.q_proj.weight",
       lambda w: w.T.reshape(d, h, hd), lambda w: w.reshape(d, h * hd).T),
      (("layers", "attn", "k_proj"), "model.layers.{i}.self_attn.k_proj.weight",
       lambda w: w.T.reshape(d, kh, hd), lambda w: w.reshape(d, kh * hd).T),
      (("layers", "attn", "v_proj"), "model.layers.{i}.self_attn.v_proj.weight",
       lambda w: w.T.reshape(d, kh, hd), lambda w: w.reshape(d, kh * hd).T),
      (("layers", "attn", "o_proj"), "model.layers.{i}.self_attn.o_proj.weight",
       lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T),
      (("layers", "mlp", "gate_proj"), "model.layers.{i}.mlp.gate_proj.weight", T, T),
      (("layers", "mlp", "up_proj"), "model.layers.{i}.mlp.up_proj.weight", T, T),
      (("layers", "mlp", "down_proj"), "model.layers.{i}.mlp.down_proj.weight", T, T),
      (("layers", "input_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
       lambda w: w, lambda w: w),
      (("layers", "post_attn_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
       lambda w: w, lambda w: w),
      (("norm", "scale"), "model.norm.weight", lambda w: w, lambda w: w),
      (("lm_head",), "lm_head.weight", T, T),
  ]


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# --- reading -----------------------------------------------------------------------------------

def read_hf_config(folder: str) -> LlamaConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {folder}")
  with open(path) as f:
    return LlamaConfig.from_hf_config(json.load(f))


def _weight_files(folder: str) -> dict[str, str]:
  """tensor name -> safetensors file, from the index or by scanning single files."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    missing = sorted({fn for fn in weight_map.values() if not os.path.isfile(os.path.join(folder, fn))})
    if missing:
      raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}
  files = sorted(fn for fn in os.listdir(folder) if fn.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files (and no index) in {folder}")
  out = {}
  for fn in files:
    with safe_open(os.path.join(folder, fn), framework="numpy") as f:
      for k in f.keys():
        out[k] = os.path.join(folder, fn)
  return out


class _TensorReader:
  """Memory-mapped access to tensors by name, keeping each file open once."""

  def __init__(self, files: dict[str, str]):
    self.files = files
    self._open: dict[str, Any] = {}

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ConversionError(f"tensor {name!r} is missing from the checkpoint")
    fn = self.files[name]
    if fn not in self._open:
      try:
        self._open[fn] = safe_open(fn, framework="numpy")
      except Exception as e:  # truncated or not a safetensors file
        raise ConversionError(f"cannot read {fn}: {e}") from e
    return self._open[fn].get_tensor(name)

  def release(self) -> None:
    """Drop the open files so their mapped pages can leave resident memory."""
    self._open.clear()


def iter_hf_params(folder: str, cfg: LlamaConfig, dtype: str | None = None
                   ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yield (our path, stacked numpy array) one parameter at a time, checking every shape."""
  reader = _TensorReader(_weight_files(folder))
  expected = set(reader.files)
  from astrollama_jax.model.llama import param_shapes
  shapes = param_shapes(cfg)
  out_dtype = np.dtype(dtype) if dtype else None
  used = set()
  for path, template, from_hf, to_hf in _mapping(cfg):
    target = _get(shapes, path)
    layered = "{i}" in template
    names = [template.format(i=i) for i in range(cfg.n_layers)] if layered else [template]
    per_shape = target.shape[1:] if layered else target.shape
    hf_expected = to_hf(np.empty(per_shape, np.int8)).shape
    stacked = None
    for li, name in enumerate(names):
      w = reader.get(name)
      if w.shape != hf_expected:
        raise ConversionError(
            f"tensor {name!r} has shape {tuple(w.shape)} but the config expects {hf_expected}")
      w = from_hf(w)
      if stacked is None:
        dt = out_dtype or w.dtype
        stacked = np.empty(target.shape, dt) if layered else None
      if layered:
        stacked[li] = w
      else:
        stacked = np.asarray(w, dtype=out_dtype or w.dtype)
      used.add(name)
    reader.release()
    yield path, stacked
  extra = sorted(n for n in expected - used if "rotary_emb" not in n)
  if extra:
    logging.warning("ignored %d tensors not in LLaMA-2: %s", len(extra), extra[:5])


def load_hf(folder: str, dtype: str | None = None, cfg: LlamaConfig | None = None
            ) -> tuple[LlamaConfig, Params]:
  """Read an HF Llama folder into (config, numpy params). ``dtype`` casts on the way."""
  hf_cfg = read_hf_config(folder)
  if cfg is None:
    cfg = hf_cfg.replace(param_dtype=dtype or "float32")
  else:
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      if getattr(cfg, field) != getattr(hf_cfg, field):
        raise ConversionError(f"config mismatch: {field} is {getattr(hf_cfg, field)} in "
                              f"{folder}/config.json but {getattr(cfg, field)} in the model config")
  params: Params = {}
  for path, arr in iter_hf_params(folder, cfg, dtype):
    _set(params, path, arr)
  return cfg, params


# --- writing -----------------------------------------------------------------------------------

def iter_hf_tensors(cfg: LlamaConfig, params: Params, dtype: str | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (HF name, numpy array) for every tensor, in HF order, one at a time."""
  out_dtype = np.dtype(dtype) if dtype else None
  mapping = _mapping(cfg)
  flat = [(p, t, f) for p, t, _, f in mapping if "{i}" not in t]
  layer = [(p, t, f) for p, t, _, f in mapping if "{i}" in t]

  def fetch(x):
    x = np.asarray(x)  # gathers a sharded jax.Array
    return x if out_dtype is None else x.astype(out_dtype)

  yield "model.embed_tokens.weight", fetch(_get(params, flat[0][0]))
  for i in range(cfg.n_layers):
    for path, template, to_hf in layer:
      yield template.format(i=i), np.ascontiguousarray(to_hf(fetch(_get(params, path)[i])))
  for path, template, to_hf in flat[1:]:
    yield template, np.ascontiguousarray(to_hf(fetch(_get(params, path))))


def save_hf(cfg: LlamaConfig, params: Params, folder: str, dtype: str | None = None,
            max_shard_bytes: int = 2 * 1024**3, extra_files: Callable[[str], None] | None = None,
            progress: Callable[[str, np.ndarray], None] | None = None) -> dict[str, Any]:
  """Write an HF folder (config.json, generation_config.json, sharded safetensors + index).

  The folder appears atomically: everything is written into a temporary sibling and renamed
  at the end, so an interrupted export never leaves a folder that looks complete. A disk too
  small for the tensors is refused up front; one that fills up anyway (other writers) gives a
  ``diskspace.DiskFullError`` naming ``folder``, with the temporary sibling removed.
  ``extra_files(tmpdir)`` may add tokenizer files before the rename.
  """
  folder = os.path.abspath(folder)
  if os.path.exists(folder) and os.listdir(folder):
    raise FileExistsError(f"output folder {folder} exists and is not empty")
  diskspace.check_free_space(folder, sum(x.size * np.dtype(dtype or x.dtype).itemsize
                                         for x in jax.tree.leaves(params)), "the output folder")
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(folder) + "-", dir=parent)
  t0 = time.time()
  try:
    weight_map, shard, shard_bytes, shard_files = {}, {}, 0, []
    total_bytes = total_params = n_tensors = 0

    def flush():
      nonlocal shard, shard_bytes
      if shard:
        fn = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(tmp, fn), metadata={"format": "pt"})
        shard_files.append(fn)
        for k in shard:
          weight_map[k] = fn
        shard, shard_bytes = {}, 0

    for name, arr in iter_hf_tensors(cfg, params, dtype):
      if shard and shard_bytes + arr.nbytes > max_shard_bytes:
        flush()
      shard[name] = arr
      shard_bytes += arr.nbytes
      total_bytes += arr.nbytes
      total_params += arr.size
      n_tensors += 1
      if progress:
        progress(name, arr)
    flush()
    n = len(shard_files)
    renamed = {}
    for j, fn in enumerate(shard_files):
      new = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
      os.rename(os.path.join(tmp, fn), os.path.join(tmp, new))
      renamed[fn] = new
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total_bytes},
                 "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}, f, indent=2)
    hf_cfg = cfg.to_hf_config()
    hf_cfg["torch_dtype"] = str(np.dtype(dtype)) if dtype else cfg.param_dtype
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                 "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": cfg.max_seq_len}, f,
                indent=2)
    if extra_files:
      extra_files(tmp)
    if os.path.exists(folder):
      os.rmdir(folder)
    os.rename(tmp, folder)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if diskspace.is_disk_full(e):
      raise diskspace.disk_full_error(folder, "the output folder") from e
    raise
  return {"tensors": n_tensors, "parameters": total_params, "bytes": total_bytes,
          "shards": len(shard_files), "seconds": time.time() - t0}
