"""Hugging Face ``LlamaForCausalLM`` folders (``config.json`` + safetensors) <-> our parameters.

Reading memory-maps the safetensors files and stacks one parameter at a time
(``mapping.stack_params``), so host memory holds at most the model once plus one tensor.
Writing transposes one tensor at a time into shards of at most ``max_shard_bytes``, inside
``diskspace.atomic_directory``, so an interrupted export never leaves a folder that looks
complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from safetensors import safe_open
from safetensors.numpy import save_file

from astrollama_jax import diskspace
from astrollama_jax.formats import mapping
from astrollama_jax.formats.mapping import ConversionError
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]
INDEX_FILE = "model.safetensors.index.json"


# --- reading -----------------------------------------------------------------------------------


def read_hf_config(folder: str) -> LlamaConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {folder}")
  with open(path) as f:
    return LlamaConfig.from_hf_config(json.load(f))


def weight_files(folder: str) -> dict[str, str]:
  """tensor name -> safetensors file, from the index or by scanning single files.

  An index may only name files inside ``folder``: a checkpoint from elsewhere must not make us
  open arbitrary files (``../../x`` or an absolute path is refused).
  """
  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    for name, fn in weight_map.items():
      if os.path.isabs(fn) or os.path.normpath(fn).split(os.sep)[0] == os.pardir:
        raise ConversionError(
          f"{index}: weight_map entry {name!r} points outside the folder "
          f"({fn!r}); shard files must be inside {folder}"
        )
    missing = sorted(
      {fn for fn in weight_map.values() if not os.path.isfile(os.path.join(folder, fn))}
    )
    if missing:
      raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}
  files = sorted(fn for fn in os.listdir(folder) if fn.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files (and no index) in {folder}")
  out = {}
  for fn in files:
    with safe_open(os.path.join(folder, fn), framework="numpy") as f:
      for k in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
        out[k] = os.path.join(folder, fn)
  return out


class TensorReader:
  """Memory-mapped access to an HF folder's tensors by name, keeping each file open once."""

  def __init__(self, folder: str):
    self.files = weight_files(folder)
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


def stored_dtype(folder: str) -> str:
  """The dtype an HF folder stores (that of its embedding table)."""
  return str(TensorReader(folder).get("model.embed_tokens.weight").dtype)


def iter_hf_params(
  folder: str,
  cfg: LlamaConfig,
  dtype: str | None = None,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """Yield (our path, stacked numpy array) one parameter at a time, checking every shape."""
  reader = TensorReader(folder)
  used: set[str] = set()

  def read(entry: mapping.Tensor, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    del shape  # checked by stack_params
    for name in entry.hf_names(cfg.n_layers):
      used.add(name)
      yield reader.get(name)
    reader.release()

  yield from mapping.stack_params(cfg, read, dtype, progress)
  extra = sorted(n for n in set(reader.files) - used if "rotary_emb" not in n)
  if extra:
    logging.warning("ignored %d tensors not in LLaMA-2: %s", len(extra), extra[:5])


def load_hf(
  folder: str, dtype: str | None = None, cfg: LlamaConfig | None = None
) -> tuple[LlamaConfig, Params]:
  """Read an HF Llama folder into (config, numpy params). ``dtype`` casts on the way."""
  hf_cfg = read_hf_config(folder)
  if cfg is None:
    cfg = hf_cfg.replace(param_dtype=dtype or "float32")
  else:
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      if getattr(cfg, field) != getattr(hf_cfg, field):
        raise ConversionError(
          f"config mismatch: {field} is {getattr(hf_cfg, field)} in "
          f"{folder}/config.json but {getattr(cfg, field)} in the model config"
        )
  params: Params = {}
  for path, arr in iter_hf_params(folder, cfg, dtype):
    mapping.set_path(params, path, arr)
  return cfg, params


# --- writing -----------------------------------------------------------------------------------


def save_hf(
  cfg: LlamaConfig,
  params: Params,
  folder: str,
  dtype: str | None = None,
  max_shard_bytes: int = 2 * 1024**3,
  extra_files: Callable[[str], None] | None = None,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, Any]:
  """Write an HF folder (config.json, generation_config.json, sharded safetensors + index).

  The folder appears atomically (``diskspace.atomic_directory``). A disk too small for the
  tensors is refused up front; one that fills up anyway (other writers) gives a
  ``diskspace.DiskFullError`` naming ``folder``. ``extra_files(tmpdir)`` may add tokenizer
  files before the folder appears.
  """
  folder = os.path.abspath(folder)
  diskspace.check_free_space(
    folder,
    sum(x.size * np.dtype(dtype or x.dtype).itemsize for x in jax.tree.leaves(params)),
    "the output folder",
  )
  t0 = time.time()
  with diskspace.atomic_directory(folder) as tmp:
    shard: dict[str, np.ndarray] = {}
    files: list[list[str]] = []  # the tensor names of every shard written
    total_bytes = total_params = n_tensors = 0

    def flush():
      nonlocal shard
      save_file(
        shard,
        os.path.join(tmp, f"model-{len(files) + 1:05d}.safetensors"),
        metadata={"format": "pt"},
      )
      files.append(list(shard))
      shard = {}

    for name, arr in mapping.hf_tensors(cfg, params, dtype):
      if shard and sum(a.nbytes for a in shard.values()) + arr.nbytes > max_shard_bytes:
        flush()
      shard[name] = arr
      total_bytes += arr.nbytes
      total_params += arr.size
      n_tensors += 1
      if progress:
        progress(name, arr)
    if shard:
      flush()
    weight_map = {}
    for j, names in enumerate(files):
      final = f"model-{j + 1:05d}-of-{len(files):05d}.safetensors"
      os.rename(os.path.join(tmp, f"model-{j + 1:05d}.safetensors"), os.path.join(tmp, final))
      weight_map.update({k: final for k in names})
    _write_json(
      tmp,
      INDEX_FILE,
      {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
    )
    hf_cfg = cfg.to_hf_config()
    hf_cfg["torch_dtype"] = str(np.dtype(dtype)) if dtype else cfg.param_dtype
    _write_json(tmp, "config.json", hf_cfg)
    _write_json(
      tmp,
      "generation_config.json",
      {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": cfg.max_seq_len,
      },
    )
    if extra_files:
      extra_files(tmp)
  return {
    "tensors": n_tensors,
    "parameters": total_params,
    "bytes": total_bytes,
    "shards": len(files),
    "seconds": time.time() - t0,
  }


def _write_json(folder: str, name: str, value: Any) -> None:
  with open(os.path.join(folder, name), "w") as f:
    json.dump(value, f, indent=2)
