"""Our on-disk parameter format (its one writer and one reader) and ``load_model`` of every kind.

Four kinds of path hold a model, and ``load_model`` accepts all of them:

* an HF folder (``config.json`` + safetensors): read through ``formats.hf``;
* a converted DIR: ``model_config.json``, ``tokenizer.model``, ``params/`` (Orbax);
* a training WORKDIR: ``model_config.json``, ``tokenizer.model``, ``checkpoints/<step>/params``
  (``train.checkpointing`` writes the steps; the latest finalized one is taken);
* one step folder ``WORKDIR/checkpoints/<step>``.

A LoRA workdir (``lora.json``, see ``lora_base``) holds adapters only: loading it re-reads the
base it names and merges the adapters in.
``open_model`` leaves the parameters on disk and reads them slice by slice (export's memory bound).

Parameters are written and read with one Orbax API, ``orbax.checkpoint.experimental.v1``. The
writer (``write_params``) adds one parameter at a time to the checkpoint (Orbax's partial saves)
and drops it: a 70B model is ~130 GiB in bfloat16, and host memory stays at about twice the
largest stacked parameter (the array, plus tensorstore's buffers while it writes), not the
model; see docs/benchmarks.md. Arrays are written in chunks of about ``CHUNK_BYTES`` so that a
later restore onto a different mesh reads just the chunks that overlap its shards. The whole
DIR is written under a temporary name (``atomic_directory``), so an interrupted write never
leaves a folder that looks complete.

The reader restores straight onto the target shardings (``llama.param_shardings``): every
process asks tensorstore only for its own slices, so no full array is assembled on one host.
It reads both the layout the writer makes (the tree under ``params/state``) and the flat one of
training steps and of older converted DIRs. Only the ``params`` item of a training step is
read; the optimizer state is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable
import ctypes
import dataclasses
import json
import os
from typing import Any

import jax
from jax.sharding import Mesh, SingleDeviceSharding
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental import v1

from astrollama_jax.formats import hf, mapping
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.util import diskspace
from astrollama_jax.util.diskspace import atomic_directory  # part of this module's API too

Params = dict[str, Any]
Path = tuple[str, ...]

CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
CHUNK_BYTES = 64 * 1024**2
DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
  """A checkpoint path is not what it should be: names the path and what is wrong."""


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: config (param_dtype = the dtype of ``params``), params, tokenizer."""

  cfg: LlamaConfig
  params: Params
  tokenizer_path: str | None
  kind: str = ""  # "hf", "converted", "workdir" or "step"
  step: int | None = None


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


def _keys(path: tuple[Any, ...]) -> Path:
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


# --- writing --------------------------------------------------------------------------------


def write_side_files(directory: str, cfg: LlamaConfig, tokenizer_path: str | None) -> None:
  """``model_config.json`` and a copy of ``tokenizer.model`` (primary process only).

  Each file is replaced atomically: a resumed run rewrites them in a WORKDIR that already
  holds checkpoints, and a full disk must not leave those checkpoints without a readable config.
  """
  if jax.process_index() != 0:
    return
  diskspace.write_atomic(os.path.join(directory, CONFIG_FILE), cfg.to_json())
  if tokenizer_path:
    if not os.path.isfile(tokenizer_path):
      raise FileNotFoundError(f"tokenizer model not found: {tokenizer_path}")
    with open(tokenizer_path, "rb") as f:
      diskspace.write_atomic(os.path.join(directory, TOKENIZER_FILE), f.read())


def _release_memory() -> None:
  """Hand freed heap back to the OS (glibc keeps it otherwise).

  Without this the buffers tensorstore's threads allocate and free stay in glibc arenas, and
  resident memory after writing (or restoring to host) a 1B model sits ~3x above the bound.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


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
  with atomic_directory(directory) as tmp:
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
        _release_memory()
        written.add(tuple(path))
      missing = sorted(
        {_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]} - written
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
  write_params(directory, cfg, ((_keys(p), x) for p, x in leaves), tokenizer_path)
  return os.path.abspath(directory)


# --- finding what a path holds ------------------------------------------------------------------


def read_model_config(path: str) -> LlamaConfig:
  file = os.path.join(path, CONFIG_FILE)
  try:
    with open(file) as f:
      return LlamaConfig.from_dict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"cannot read the model config {file}: {e}") from e


def _is_step(folder: str) -> bool:
  """A finalized step folder (an interrupted save keeps Orbax's temporary name)."""
  return os.path.basename(folder).isdigit() and ocp.step.is_path_finalized(folder)


def _latest_step(checkpoints: str) -> int:
  steps = [int(n) for n in os.listdir(checkpoints) if _is_step(os.path.join(checkpoints, n))]
  if not steps:
    raise CheckpointError(f"{checkpoints} holds no complete checkpoint step")
  return max(steps)


def locate(path: str) -> tuple[str, str, str | None, int | None]:
  """(kind, folder with model_config.json or HF config.json, Orbax params dir or None, step)."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  has = lambda *p: os.path.exists(os.path.join(path, *p))
  if has(CONFIG_FILE) and has(PARAMS_DIR):
    return "converted", path, os.path.join(path, PARAMS_DIR), None
  if has(CONFIG_FILE) and has(CHECKPOINTS_DIR):
    step = _latest_step(os.path.join(path, CHECKPOINTS_DIR))
    return "workdir", path, os.path.join(path, CHECKPOINTS_DIR, str(step), PARAMS_DIR), step
  parent = os.path.dirname(path)
  if (
    os.path.basename(parent) == CHECKPOINTS_DIR
    and has(PARAMS_DIR)
    and os.path.isfile(os.path.join(os.path.dirname(parent), CONFIG_FILE))
  ):
    if not _is_step(path):
      raise CheckpointError(f"{path} is not a complete checkpoint step (interrupted save?)")
    return (
      "step",
      os.path.dirname(parent),
      os.path.join(path, PARAMS_DIR),
      int(os.path.basename(path)),
    )
  if has("config.json") and any(f.endswith(".safetensors") for f in os.listdir(path)):
    return "hf", path, None, None
  raise CheckpointError(
    f"{path} is not a model: expected an HF folder (config.json + *.safetensors), a converted "
    f"DIR ({CONFIG_FILE} + {PARAMS_DIR}/), a training WORKDIR ({CONFIG_FILE} + "
    f"{CHECKPOINTS_DIR}/) or a step folder WORKDIR/{CHECKPOINTS_DIR}/<step>"
  )


# --- restoring ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _HostArray:
  """Restore a leaf as a numpy array of this dtype (Orbax v1's abstract numpy leaf)."""

  shape: tuple[int, ...]
  dtype: np.dtype


def _orbax_item(params_dir: str) -> tuple[str, dict[str, str]]:
  """Where Orbax finds a ``params/`` folder: (checkpoint, ``checkpointable_name`` argument).

  A converted DIR's ``params/`` is a checkpoint of its own; a training step's is the ``params``
  item of the step's checkpoint (``WORKDIR/checkpoints/<step>``).
  """
  if os.path.isfile(os.path.join(params_dir, "_CHECKPOINT_METADATA")):
    return params_dir, {}
  return os.path.dirname(params_dir), {"checkpointable_name": os.path.basename(params_dir)}


def stored_metadata(params_dir: str) -> Params:
  """Shape/dtype (and chunk) metadata of every stored parameter; reads no array data."""
  try:
    root, item = _orbax_item(params_dir)
    tree = v1.metadata(root, **item).metadata
  except Exception as e:  # an interrupted write, or not an Orbax checkpoint at all
    raise CheckpointError(f"{params_dir} is not a complete Orbax checkpoint: {e}") from e
  # Orbax answers unreadable metadata with a warning and an empty or placeholder tree
  if not any(hasattr(x, "shape") for x in jax.tree.leaves(tree)):
    raise CheckpointError(
      f"{params_dir} is not a complete Orbax checkpoint: its metadata names no array"
    )
  return tree


def restore_params(
  params_dir: str,
  cfg: LlamaConfig,
  mesh: Mesh | None = None,
  dtype: str | None = None,
  on_host: bool = False,
) -> Params:
  """Restore an Orbax params tree onto ``mesh`` (or the first device), cast to ``dtype``.

  Shapes are checked against ``cfg`` from the metadata before any data is read. With
  ``on_host`` the leaves come back as numpy arrays (export: no accelerator memory needed).
  """
  stored = stored_metadata(params_dir)
  check_params(cfg, stored, params_dir)
  if on_host:
    return restore_on_host(params_dir, dtype, stored)
  else:
    if mesh is not None:
      shardings = llama.param_shardings(cfg, mesh)
    else:
      device = SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: device, llama.param_shapes(cfg))
    target = jax.tree.map(
      lambda m, sh: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(dtype or m.dtype), sharding=sh),
      stored,
      shardings,
    )
  root, item = _orbax_item(params_dir)
  return v1.load(root, target, **item)


def restore_on_host(
  params_dir: str, dtype: str | None = None, stored: Params | None = None
) -> Params:
  """Every stored leaf as a numpy array (cast to ``dtype``), whatever the tree: a model's
  parameters, or a LoRA step's adapters."""
  stored = stored_metadata(params_dir) if stored is None else stored
  target = jax.tree.map(lambda m: _HostArray(tuple(m.shape), np.dtype(dtype or m.dtype)), stored)
  root, item = _orbax_item(params_dir)
  return v1.load(root, target, **item)


class StoredArray:
  """One stored parameter, read only when asked: ``x[i]`` reads layer ``i`` alone.

  Export walks the model one HF tensor at a time; reading each through tensorstore as it is
  needed keeps host memory at about one tensor instead of the whole model. Reads go through
  tensorstore's cast driver, as Orbax's own restore does, so a cast gives the same bits.
  """

  def __init__(self, store: Any, shape: tuple[int, ...], dtype: np.dtype):
    self._store, self.shape, self.dtype = store, tuple(shape), np.dtype(dtype)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __getitem__(self, index: Any) -> np.ndarray:
    return np.asarray(self._store[index].read().result())

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    x = np.asarray(self._store.read().result())
    return x if dtype is None else x.astype(dtype)


def _open_array(root: str, name: str, dtype: np.dtype, context: Any) -> Any:
  """A tensorstore handle on the stored array ``name`` under ``root``, cast to ``dtype``."""
  import tensorstore as ts

  if os.path.isfile(os.path.join(root, "manifest.ocdbt")):
    kvstore = {"driver": "ocdbt", "base": f"file://{root}/", "path": f"{name}/"}
  else:
    kvstore = {"driver": "file", "path": os.path.join(root, name) + "/"}
  error = None
  for driver in ("zarr3", "zarr"):
    try:
      store = ts.open(
        {"driver": driver, "kvstore": kvstore}, open=True, read=True, context=context
      ).result()
      if store.dtype.numpy_dtype == dtype:
        return store
      return ts.cast(store, ts.dtype(np.dtype(dtype).name))
    except ValueError as e:  # not this zarr version
      error = e
  raise CheckpointError(f"cannot open parameter {name} under {root}: {error}")


def open_params(params_dir: str, cfg: LlamaConfig, dtype: str | None = None) -> Params:
  """The params of ``params_dir`` as ``StoredArray`` leaves (nothing read yet), cast to ``dtype``.

  Shapes are checked against ``cfg`` from the metadata first, as ``restore_params`` does.
  """
  import tensorstore as ts

  stored = stored_metadata(params_dir)
  check_params(cfg, stored, params_dir)
  state = os.path.join(params_dir, "state")  # the writer's layout; training steps are flat
  root = state if os.path.isfile(os.path.join(state, "_METADATA")) else params_dir
  context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
  out: Params = {}
  for path, m in jax.tree_util.tree_flatten_with_path(stored)[0]:
    keys = _keys(path)
    want = np.dtype(dtype or m.dtype)
    store = _open_array(os.path.abspath(root), ".".join(keys), want, context)
    arr = StoredArray(store, m.shape, want)
    if tuple(arr._store.shape) != tuple(m.shape):
      raise CheckpointError(
        f"{params_dir}: parameter {'/'.join(keys)} is stored with shape "
        f"{tuple(arr._store.shape)} but its metadata says {tuple(m.shape)}"
      )
    mapping.set_path(out, keys, arr)
  return out


def open_model(path: str, dtype: str | None = None) -> LoadedModel:
  """``load_model(path, dtype=dtype, on_host=True)``, but an Orbax checkpoint's parameters stay on
  disk as ``StoredArray``s, read slice by slice by whoever walks them (export). An HF folder, and
  a LoRA workdir (its adapters merged into the base in memory), are loaded whole instead."""
  from astrollama_jax.checkpoints import lora_base

  dtype = check_dtype(dtype)
  kind, root, params_dir, step = locate(path)
  if kind == "hf" or (kind in ("workdir", "step") and lora_base.read(root) is not None):
    return load_model(path, dtype=dtype, on_host=True)
  tokenizer = os.path.join(root, TOKENIZER_FILE)
  cfg = read_model_config(root)
  params = open_params(params_dir, cfg, dtype)
  cfg = cfg.replace(param_dtype=str(params["embed"].dtype))
  return LoadedModel(cfg, params, tokenizer if os.path.isfile(tokenizer) else None, kind, step)


def load_model(
  path: str, mesh: Mesh | None = None, dtype: str | None = None, on_host: bool = False
) -> LoadedModel:
  """Load any model path (see the module docstring) onto ``mesh``, optionally cast to ``dtype``.

  The returned config's ``param_dtype`` is the dtype of the returned params. ``on_host``
  returns numpy arrays instead of device arrays (``mesh`` is then ignored).
  """
  dtype = check_dtype(dtype)
  kind, root, params_dir, step = locate(path)
  tokenizer = os.path.join(root, TOKENIZER_FILE)
  tokenizer = tokenizer if os.path.isfile(tokenizer) else None
  if kind == "hf":
    cfg, host = hf.load_hf(root, dtype=dtype)
    cfg = cfg.replace(param_dtype=str(np.dtype(host["embed"].dtype)))
    if on_host:
      params = host
    else:
      shardings = (
        llama.param_shardings(cfg, mesh)
        if mesh is not None
        else jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), host)
      )
      params = _device_put_leaf_by_leaf(host, shardings)
  else:
    from astrollama_jax.checkpoints import lora_base

    cfg = read_model_config(root)
    record = lora_base.read(root) if kind in ("workdir", "step") else None
    if record is not None:  # adapters: merged into their (re-read) base
      cfg, params = lora_base.load_merged(record, root, params_dir, cfg, mesh, dtype, on_host)
    else:
      params = restore_params(params_dir, cfg, mesh, dtype, on_host)
      cfg = cfg.replace(param_dtype=str(np.dtype(params["embed"].dtype)))
  if on_host:
    _release_memory()  # what reading left in glibc's arenas: export needs the room next
  return LoadedModel(cfg, params, tokenizer, kind, step)


def _device_put_leaf_by_leaf(host: Params, shardings: Params) -> Params:
  """Move numpy leaves to devices one at a time, dropping each host copy as it goes."""
  out: Params = {}
  for key in list(host):
    if isinstance(host[key], dict):
      out[key] = _device_put_leaf_by_leaf(host[key], shardings[key])
    else:
      out[key] = jax.device_put(host.pop(key), shardings[key])
  return out
