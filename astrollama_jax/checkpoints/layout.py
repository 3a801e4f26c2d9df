"""What our on-disk model format is made of: its file names, dtypes, error and shape check.

A converted DIR is ``model_config.json`` + the tokenizer + ``params/`` (Orbax); a training
WORKDIR holds the same side files and ``checkpoints/<step>/params``. The tokenizer is kept under
the name its kind has: ``tokenizer.model`` (SentencePiece, or Meta's tiktoken ranks) or
``tokenizer.json`` (a Hugging Face byte-level BPE); ``tokenizer_in`` finds it. Every module of this
package (writer, reader, locate, loader, lora_base) takes these names from here, so the layout
is spelled once.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import jax
import numpy as np

from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]
Path = tuple[str, ...]

CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
  """A checkpoint path is not what it should be: names the path and what is wrong."""


def tokenizer_name(tokenizer_path: str) -> str:
  """The name a copy of ``tokenizer_path`` takes in a checkpoint folder."""
  from astrollama_jax.data import tokenizer

  return (
    TOKENIZER_JSON if tokenizer.detect(tokenizer_path)[0] == tokenizer.HF_JSON else TOKENIZER_FILE
  )


def tokenizer_in(folder: str) -> str | None:
  """The tokenizer file of a checkpoint or model folder (``data.tokenizer.detect``), or None."""
  from astrollama_jax.data import tokenizer

  try:
    return tokenizer.detect(folder)[1] if os.path.isdir(folder) else None
  except FileNotFoundError:
    return None


def check_dtype(dtype: Any) -> str | None:
  """Normalise a dtype (name or numpy/jax dtype) to its name, or raise naming the allowed ones."""
  if dtype is None:
    return None
  try:
    name = str(np.dtype(dtype))
  except TypeError:
    name = str(dtype)
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
  return name


def keys(path: tuple[Any, ...]) -> Path:
  """A ``tree_flatten_with_path`` path as the tuple of its dict keys."""
  return tuple(str(k.key) for k in path)


def check_params(cfg: LlamaConfig, params: Params, what: str = "params") -> None:
  """Raise naming the first parameter whose shape does not fit ``cfg`` (or that is missing)."""
  want = jax.tree_util.tree_flatten_with_path(llama.param_shapes(cfg))[0]
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  got = {jax.tree_util.keystr(k): v for k, v in got.items()}
  for path, spec in want:
    key = jax.tree_util.keystr(path)
    if key not in got:
      raise CheckpointError(f"{what}: parameter {key} is missing (expected shape {spec.shape})")
    if tuple(got[key].shape) != tuple(spec.shape):
      raise CheckpointError(
        f"{what}: parameter {key} has shape {tuple(got[key].shape)} but the "
        f"model config expects {tuple(spec.shape)}"
      )
  extra = sorted(set(got) - {jax.tree_util.keystr(p) for p, _ in want})
  if extra:
    raise CheckpointError(f"{what}: parameters not in the model: {extra}")


def release_memory() -> None:
  """Hand freed heap back to the OS (glibc keeps it otherwise).

  Without this the buffers tensorstore's threads allocate and free stay in glibc arenas, and
  resident memory after writing (or restoring to host) a 1B model sits ~3x above the bound.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass
