"""The one writer of our format: a converted DIR, streamed one parameter at a time.

Parameters are written with Orbax's v1 API (``orbax.checkpoint.experimental.v1``). The writer
(``write_params``) adds one parameter at a time to the checkpoint (Orbax's partial saves) and
drops it: a 70B model is ~130 GiB in bfloat16, and host memory stays at about twice the largest
stacked parameter (the array, plus tensorstore's buffers while it writes), not the model; see
docs/benchmarks.md. Arrays are written in chunks of about ``CHUNK_BYTES`` so that a later
restore onto a different mesh reads just the chunks that overlap its shards. The whole DIR is
written under a temporary name (``diskspace.atomic_directory``), so an interrupted write never
leaves a folder that looks complete.
"""

from __future__ import annotations

from collections.abc import Iterable
import os
from typing import Any

import jax
import numpy as np
from orbax.checkpoint.experimental import v1

from astrollama_jax.checkpoints.layout import (
  CONFIG_FILE,
  DTYPES,
  PARAMS_DIR,
  TOKENIZER_FILE,
  TOKENIZER_JSON,
  CheckpointError,
  Params,
  Path,
  check_params,
  keys,
  release_memory,
  tokenizer_name,
)
from astrollama_jax.formats import mapping
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.util import diskspace

CHUNK_BYTES = 64 * 1024**2


def write_side_files(directory: str, cfg: LlamaConfig, tokenizer_path: str | None) -> None:
  """``model_config.json`` and a copy of the tokenizer, under its kind's name (``layout``),
  replacing a copy of another kind (primary process only).

  Each file is replaced atomically: a resumed run rewrites them in a WORKDIR that already
  holds checkpoints, and a full disk must not leave those checkpoints without a readable config.
  """
  if jax.process_index() != 0:
    return
  diskspace.write_atomic(os.path.join(directory, CONFIG_FILE), cfg.to_json())
  if tokenizer_path:
    if not os.path.isfile(tokenizer_path):
      raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path}")
    name = tokenizer_name(tokenizer_path)
    with open(tokenizer_path, "rb") as f:
      diskspace.write_atomic(os.path.join(directory, name), f.read())
    other = os.path.join(directory, TOKENIZER_JSON if name == TOKENIZER_FILE else TOKENIZER_FILE)
    if os.path.isfile(other):
      os.remove(other)


def _context() -> v1.Context:
  """How every parameter array is stored: chunks of ~``CHUNK_BYTES``, no compression.

  Weights barely compress, and skipping zstd halves the write time on few cores. Each array is
  handed over once and never touched again, so Orbax need not copy it first (that copy would
  double the peak).
  """
  ctx = v1.Context()
  ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
  ctx.array.saving.use_compression = False
  ctx.memory.deepcopy_host_arrays = False
  return ctx


def write_params(
  directory: str,
  cfg: LlamaConfig,
  params: Iterable[tuple[Path, Any]],
  tokenizer_path: str | None = None,
) -> dict[str, int]:
  """Stream ``(path, array)`` pairs into the converted DIR ``directory``; returns counts.

  Every array (numpy, or a ``jax.Array`` on this process's devices) must have the shape and
  dtype ``cfg`` gives it, and the finished checkpoint must hold every parameter of the model.
  Each one is written as it arrives and then dropped, so the caller may build them one by one.
  """
  shapes = llama.param_shapes(cfg)
  n_params = n_bytes = n_arrays = 0
  written: set[Path] = set()
  with diskspace.atomic_directory(directory) as tmp:
    write_side_files(tmp, cfg, tokenizer_path)
    target = os.path.join(tmp, PARAMS_DIR)
    with _context():
      for path, arr in params:
        try:
          want = mapping.get_path(shapes, path)
        except (KeyError, TypeError):
          raise CheckpointError(f"parameter {'/'.join(path)} is not in the model") from None
        if tuple(arr.shape) != tuple(want.shape) or str(arr.dtype) != cfg.param_dtype:
          raise CheckpointError(
            f"parameter {'/'.join(path)} is {arr.dtype}{list(arr.shape)} but the "
            f"config expects {cfg.param_dtype}{list(want.shape)}"
          )
        n_params += arr.size
        n_bytes += arr.size * np.dtype(arr.dtype).itemsize
        n_arrays += 1
        tree: Params = {}
        mapping.set_path(tree, path, arr)
        del arr
        v1.partial.save(target, tree)
        del tree
        release_memory()
        written.add(tuple(path))
      missing = sorted(
        {keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]} - written
      )
      if missing:
        raise CheckpointError(f"parameters {missing} were never written")
      v1.partial.finalize(target)
  return {"arrays": n_arrays, "parameters": int(n_params), "bytes": int(n_bytes)}


def save_params(
  directory: str, cfg: LlamaConfig, params: Params, tokenizer_path: str | None = None
) -> str:
  """Write a whole params tree as a converted DIR (``write_params``); returns the directory.

  ``params`` may be numpy arrays or (sharded) ``jax.Array``s; ``cfg.param_dtype`` is set to
  their dtype so the config always describes what is on disk.
  """
  check_params(cfg, params)
  dtype = str(np.dtype(params["embed"].dtype))
  cfg = cfg.replace(param_dtype=dtype) if dtype in DTYPES else cfg
  diskspace.check_free_space(
    directory,
    sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)),
    "the output folder",
  )
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  write_params(directory, cfg, ((keys(p), x) for p, x in leaves), tokenizer_path)
  return os.path.abspath(directory)
