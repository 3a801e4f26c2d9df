"""The one reader of our format: Orbax ``params/`` folders, restored whole or opened lazily.

``restore_params`` restores straight onto the target shardings (``llama.param_shardings``):
every process asks tensorstore only for its own slices, so no full array is assembled on one
host. ``open_params`` reads nothing up front: its leaves are ``StoredArray``s read slice by
slice by whoever walks them (export's memory bound). Both read the layout the writer makes (the
tree under ``params/state``) and the flat one of training steps. Only the ``params`` item of a
training step is read; the optimizer state is never touched. Shapes are checked against the
model config from the metadata before any array data is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.sharding import Mesh, SingleDeviceSharding
import numpy as np
from orbax.checkpoint.experimental import v1

from astrollama_jax.checkpoints.layout import CheckpointError, Params, check_params, keys
from astrollama_jax.formats import mapping
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig


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

  With ``on_host`` the leaves come back as numpy arrays (export: no accelerator memory needed).
  """
  stored = stored_metadata(params_dir)
  check_params(cfg, stored, params_dir)
  if on_host:
    return restore_on_host(params_dir, dtype, stored)
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


class StoredArray(mapping.LazyArray):
  """One stored parameter, read only when asked: ``x[i]`` reads layer ``i`` alone.

  Export walks the model one HF tensor at a time; reading each through tensorstore as it is
  needed keeps host memory at about one tensor instead of the whole model. Reads go through
  tensorstore's cast driver, as Orbax's own restore does, so a cast gives the same bits.
  """

  def __init__(self, store: Any, shape: tuple[int, ...], dtype: np.dtype):
    self._store, self.shape, self.dtype = store, tuple(shape), np.dtype(dtype)

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
  """The params of ``params_dir`` as ``StoredArray`` leaves (none read yet), cast to ``dtype``."""
  import tensorstore as ts

  stored = stored_metadata(params_dir)
  check_params(cfg, stored, params_dir)
  state = os.path.join(params_dir, "state")  # the writer's layout; training steps are flat
  root = state if os.path.isfile(os.path.join(state, "_METADATA")) else params_dir
  context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
  out: Params = {}
  for path, m in jax.tree_util.tree_flatten_with_path(stored)[0]:
    names = keys(path)
    want = np.dtype(dtype or m.dtype)
    store = _open_array(os.path.abspath(root), ".".join(names), want, context)
    arr = StoredArray(store, m.shape, want)
    if tuple(arr._store.shape) != tuple(m.shape):
      raise CheckpointError(
        f"{params_dir}: parameter {'/'.join(names)} is stored with shape "
        f"{tuple(arr._store.shape)} but its metadata says {tuple(m.shape)}"
      )
    mapping.set_path(out, names, arr)
  return out
