"""Write a converted checkpoint one parameter at a time, and report what conversion cost.

A 70B model is ~130 GiB in bfloat16. Building the whole params dict and handing it to Orbax
would hold all of it in host memory; instead every stacked parameter is added to the Orbax
checkpoint as soon as it is assembled (Orbax's partial saves), then dropped. Host memory is
bounded by about twice the largest stacked parameter (the array, plus tensorstore's chunk
buffers while it writes), not by the model; see docs/benchmarks.md for measurements. The partial checkpoint lives in ``params.partial_save`` until ``finalize`` renames it,
and the whole converted DIR is itself written under a temporary name (``atomic_directory``),
so an interrupted conversion never leaves a folder that looks complete.

The result, ``DIR/params``, is a standard Orbax checkpoint of the plain params dict (the v1
layout keeps the tree under ``params/state``); ``checkpoints.restore_params`` reads both it and
the ``StandardCheckpointer`` layout that training writes.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging

from astrollama_jax import checkpoints, diskspace
from astrollama_jax.convert.hf import ConversionError
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
  """Hand freed heap back to the OS (glibc keeps it otherwise).

  Without this the buffers tensorstore's writer threads allocate and free stay in glibc arenas,
  and resident memory after writing a 1B model sits ~3x above the one-parameter bound.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


class ParamsWriter:
  """Adds parameters to one Orbax checkpoint, one at a time, committed by ``finalize``."""

  def __init__(self, directory: str, chunk_bytes: int | None = None):
    from orbax.checkpoint.experimental import v1
    self._v1 = v1
    self.directory = directory
    opts = v1.options.ArrayOptions
    storage = opts.Saving.StorageOptions(chunk_byte_size=chunk_bytes or checkpoints.CHUNK_BYTES)
    # Weights barely compress; skipping zstd halves the conversion time on few cores. Each
    # array is handed over once and never touched again, so Orbax need not copy it first
    # (that copy would double the peak).
    self._context = v1.Context(
        array_options=opts(saving=opts.Saving(storage_options=storage, use_compression=False)),
        memory_options=v1.options.MemoryOptions(deepcopy_host_arrays=False))
    self.written: list[tuple[str, ...]] = []

  def add(self, path: tuple[str, ...], array: np.ndarray) -> None:
    tree: Params = {}
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = array
    with self._context:
      self._v1.partial.save(self.directory, tree)
    del tree, node, array
    release_memory()
    self.written.append(tuple(path))

  def finalize(self) -> None:
    with self._context:
      self._v1.partial.finalize(self.directory)


def write_converted(output: str, cfg: LlamaConfig, params: Iterable[tuple[tuple[str, ...], np.ndarray]],
                    tokenizer_path: str | None) -> dict[str, Any]:
  """Stream ``(path, array)`` pairs into a converted DIR; returns counts for the summary.

  Every array is checked against ``cfg`` before it is written, and the finished checkpoint must
  hold every parameter of the model.
  """
  if jax.process_count() > 1:
    raise RuntimeError("conversion runs in a single process; restore the result onto any mesh")
  shapes = llama.param_shapes(cfg)
  n_params = n_bytes = n_arrays = 0
  with checkpoints.atomic_directory(output) as tmp:
    checkpoints.write_side_files(tmp, cfg, tokenizer_path)
    writer = ParamsWriter(os.path.join(tmp, checkpoints.PARAMS_DIR))
    for path, arr in params:
      want = shapes
      for p in path:
        want = want[p]
      if tuple(arr.shape) != tuple(want.shape) or str(arr.dtype) != cfg.param_dtype:
        raise ConversionError(f"parameter {'/'.join(path)} is {arr.dtype}{list(arr.shape)} but the "
                              f"config expects {cfg.param_dtype}{list(want.shape)}")
      writer.add(path, arr)
      n_params, n_bytes, n_arrays = n_params + arr.size, n_bytes + arr.nbytes, n_arrays + 1
      del arr
    missing = sorted({tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
                     - set(writer.written))
    if missing:
      raise ConversionError(f"parameters {missing} were never written")
    writer.finalize()
  return {"arrays": n_arrays, "parameters": int(n_params), "bytes": int(n_bytes)}


# Input and output problems a user can fix: reported as one line, without a traceback.
USER_ERRORS = (ConversionError, checkpoints.CheckpointError, FileNotFoundError, FileExistsError,
               ValueError, diskspace.DiskFullError)


def run_command(what: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
  """``fn(*args)``; a user-fixable error exits the command with ``error: ...``."""
  try:
    return fn(*args)
  except USER_ERRORS as e:
    logging.error("%s failed: %s", what, e)
    raise SystemExit(f"error: {e}") from None


def report(title: str, summary: dict[str, Any]) -> None:
  """Print the closing table, then the summary as one JSON line (what scripts parse)."""
  rows = [(k, _fmt(k, v)) for k, v in summary.items()]
  width = max(len(k) for k, _ in rows)
  print(f"\n{title}\n" + "-" * (width + 30))
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  print("-" * (width + 30))
  print(json.dumps(summary))


def _fmt(key: str, value: Any) -> str:
  if isinstance(value, (int, np.integer)) and ("bytes" in key):
    return f"{value:,} ({value / 1024**3:.2f} GiB)"
  if isinstance(value, (int, np.integer)):
    return f"{value:,}"
  if isinstance(value, float):
    return f"{value:.2f}"
  return str(value)


class Timer:
  def __init__(self):
    self.t0 = time.time()

  @property
  def seconds(self) -> float:
    return round(time.time() - self.t0, 2)
