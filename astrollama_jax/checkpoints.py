"""Where model parameters live on disk, and how they come back onto a mesh.

Four kinds of path hold a model, and ``load_model`` accepts all of them:

* an HF folder (``config.json`` + safetensors): read through ``convert.hf``;
* a converted DIR: ``model_config.json``, ``tokenizer.model``, ``params/`` (Orbax);
* a training WORKDIR: ``model_config.json``, ``tokenizer.model``, ``checkpoints/<step>/params``
  written by ``orbax.checkpoint.CheckpointManager`` (the latest finalized step is taken);
* one step folder ``WORKDIR/checkpoints/<step>``.

A LoRA workdir (``lora.json``, see ``lora_base``) holds adapters only: loading it re-reads the
base it names and merges the adapters in.

Orbax params are restored straight onto the target shardings (``llama.param_shardings``): every
process asks tensorstore only for its own slices, so no full array is assembled on one host.
Only the ``params`` item of a training step is read; the optimizer state is never touched.

Arrays are written in chunks of about ``CHUNK_BYTES`` so that a later restore onto a different
mesh reads just the chunks that overlap its shards, not whole 500 MB tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, SingleDeviceSharding

from astrollama_jax import diskspace
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]

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


# --- writing --------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_directory(directory: str) -> Iterator[str]:
  """Yield a temporary sibling of ``directory``; rename it into place only on success.

  An interrupted or failed write leaves at most a hidden ``.<name>.partial`` folder (removed
  by the next attempt), never a folder under the final name that looks complete. The name is
  deterministic so that every process of a multi-host job agrees on it. A full disk anywhere
  in the block is reported as ``diskspace.DiskFullError`` naming ``directory``.
  """
  final = os.path.abspath(directory)
  if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
    raise FileExistsError(f"output {final} exists and is not empty; choose another or remove it")
  tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial")
  primary = jax.process_index() == 0
  if primary:
    if os.path.exists(tmp):
      logging.warning("removing %s left by an interrupted write", tmp)
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  _sync("atomic_directory:start")
  try:
    with diskspace.disk_full_errors(final, "the output folder"):
      yield tmp
      _sync("atomic_directory:written")
      if primary:
        if os.path.isdir(final):
          os.rmdir(final)  # empty, checked above
        os.rename(tmp, final)
      _sync("atomic_directory:renamed")
  except BaseException:
    if primary:
      _remove_settled(tmp)
    raise


def _remove_settled(folder: str, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
  """Remove ``folder``, again if it reappears, until it has stayed gone for ``quiet_s``.

  When one array write of an Orbax save fails, writes of its sibling arrays can still be in
  flight on Orbax's background threads; tensorstore recreates their parent folders, so a single
  ``rmtree`` can leave the partial folder behind.
  """
  end = time.monotonic() + limit_s
  gone_since = None
  while time.monotonic() < end:
    if os.path.exists(folder):
      shutil.rmtree(folder, ignore_errors=True)
      gone_since = None
    elif gone_since is None:
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= quiet_s:
      return
    time.sleep(0.05)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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


def chunked_save_args(params: Params, chunk_bytes: int | None = None) -> Params:
  """Orbax save args that split big host arrays into ~``chunk_bytes`` chunks."""
  chunk_bytes = chunk_bytes or CHUNK_BYTES
  return jax.tree.map(lambda x: ocp.SaveArgs(chunk_byte_size=chunk_bytes)
                      if np.asarray(x.shape).prod() * x.dtype.itemsize > chunk_bytes else ocp.SaveArgs(),
                      params)


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
      raise CheckpointError(f"{what}: parameter {key} has shape {tuple(got[key].shape)} but the "
                            f"model config expects {tuple(spec.shape)}")
  extra = sorted(set(got) - {jax.tree_util.keystr(p) for p, _ in want})
  if extra:
    raise CheckpointError(f"{what}: parameters not in the model: {extra}")


def save_params(directory: str, cfg: LlamaConfig, params: Params,
                tokenizer_path: str | None = None) -> str:
  """Write a converted DIR (``model_config.json``, ``tokenizer.model``, ``params/``) atomically.

  ``params`` may be numpy arrays or (sharded) ``jax.Array``s; ``cfg.param_dtype`` is set to
  their dtype so the config always describes what is on disk. Returns the directory.
  """
  check_params(cfg, params)
  dtype = str(np.dtype(params["embed"].dtype))
  cfg = cfg.replace(param_dtype=dtype) if dtype in DTYPES else cfg
  diskspace.check_free_space(directory, sum(x.size * np.dtype(x.dtype).itemsize
                                            for x in jax.tree.leaves(params)), "the output folder")
  with atomic_directory(directory) as tmp:
    write_side_files(tmp, cfg, tokenizer_path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), params, save_args=chunked_save_args(params))
    ckptr.wait_until_finished()
  return os.path.abspath(directory)


# --- finding what a path holds ------------------------------------------------------------------

def read_model_config(path: str) -> LlamaConfig:
  file = os.path.join(path, CONFIG_FILE)
  try:
    with open(file) as f:
      return LlamaConfig.from_dict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"cannot read the model config {file}: {e}") from e


def _latest_step(checkpoints: str) -> int:
  mgr = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = mgr.latest_step()  # finalized steps only: a half-written step is not listed
  finally:
    mgr.close()
  if step is None:
    raise CheckpointError(f"{checkpoints} holds no complete checkpoint step")
  return int(step)


def locate(path: str) -> tuple[str, str, str | None, int | None]:
  """(kind, folder with model_config.json or HF config.json, Orbax params dir or None, step)."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  has = lambda *p: os.path.exists(os.path.join(path, *p))  # noqa: E731
  if has(CONFIG_FILE) and has(PARAMS_DIR):
    return "converted", path, os.path.join(path, PARAMS_DIR), None
  if has(CONFIG_FILE) and has(CHECKPOINTS_DIR):
    step = _latest_step(os.path.join(path, CHECKPOINTS_DIR))
    return "workdir", path, os.path.join(path, CHECKPOINTS_DIR, str(step), PARAMS_DIR), step
  parent = os.path.dirname(path)
  if (os.path.basename(parent) == CHECKPOINTS_DIR and has(PARAMS_DIR)
      and os.path.isfile(os.path.join(os.path.dirname(parent), CONFIG_FILE))):
    if not ocp.step.is_path_finalized(path) or not os.path.basename(path).isdigit():
      raise CheckpointError(f"{path} is not a complete checkpoint step (interrupted save?)")
    return "step", os.path.dirname(parent), os.path.join(path, PARAMS_DIR), int(os.path.basename(path))
  if has("config.json") and any(f.endswith(".safetensors") for f in os.listdir(path)):
    return "hf", path, None, None
  raise CheckpointError(
      f"{path} is not a model: expected an HF folder (config.json + *.safetensors), a converted "
      f"DIR ({CONFIG_FILE} + {PARAMS_DIR}/), a training WORKDIR ({CONFIG_FILE} + "
      f"{CHECKPOINTS_DIR}/) or a step folder WORKDIR/{CHECKPOINTS_DIR}/<step>")


# --- restoring ------------------------------------------------------------------------------------

def pytree_dir(params_dir: str) -> str:
  """The folder holding the Orbax tree: ``params/`` (StandardCheckpointer, training) or
  ``params/state`` (the v1 layout that streaming conversion's partial saves write)."""
  for d in (params_dir, os.path.join(params_dir, "state")):
    if os.path.isfile(os.path.join(d, "_METADATA")):
      return d
  raise CheckpointError(f"{params_dir} is not a complete Orbax checkpoint (no _METADATA)")


def stored_metadata(params_dir: str) -> Params:
  """Shape/dtype metadata of every stored parameter; reads no array data."""
  try:
    return ocp.StandardCheckpointer().metadata(pytree_dir(params_dir)).item_metadata.tree
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"cannot read the Orbax metadata of {params_dir}: {e}") from e


def restore_params(params_dir: str, cfg: LlamaConfig, mesh: Mesh | None = None,
                   dtype: str | None = None, on_host: bool = False) -> Params:
  """Restore an Orbax params tree onto ``mesh`` (or the first device), cast to ``dtype``.

  Shapes are checked against ``cfg`` from the metadata before any data is read. With
  ``on_host`` the leaves come back as numpy arrays (export: no accelerator memory needed).
  """
  stored = stored_metadata(params_dir)
  check_params(cfg, stored, params_dir)
  ckptr = ocp.StandardCheckpointer()
  if on_host:
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(dtype or m.dtype)),
                        stored)
    target = jax.tree.map(lambda m: np.empty((0,), np.dtype(dtype or m.dtype)), stored)
    restored = ocp.PyTreeCheckpointer().restore(
        pytree_dir(params_dir), args=ocp.args.PyTreeRestore(item=target, restore_args=args))
    return restored
  if mesh is not None:
    shardings = llama.param_shardings(cfg, mesh)
  else:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), llama.param_shapes(cfg))
  target = jax.tree.map(
      lambda meta, sh: jax.ShapeDtypeStruct(tuple(meta.shape), np.dtype(dtype or meta.dtype), sharding=sh),
      stored, shardings)
  return ckptr.restore(pytree_dir(params_dir), target)


def load_model(path: str, mesh: Mesh | None = None, dtype: str | None = None,
               on_host: bool = False) -> LoadedModel:
  """Load any model path (see the module docstring) onto ``mesh``, optionally cast to ``dtype``.

  The returned config's ``param_dtype`` is the dtype of the returned params. ``on_host``
  returns numpy arrays instead of device arrays (``mesh`` is then ignored).
  """
  dtype = check_dtype(dtype)
  kind, root, params_dir, step = locate(path)
  tokenizer = os.path.join(root, TOKENIZER_FILE)
  tokenizer = tokenizer if os.path.isfile(tokenizer) else None
  if kind == "hf":
    from astrollama_jax.convert import hf
    cfg, host = hf.load_hf(root, dtype=dtype)
    cfg = cfg.replace(param_dtype=str(np.dtype(host["embed"].dtype)))
    if on_host:
      return LoadedModel(cfg, host, tokenizer, kind, step)
    shardings = (llama.param_shardings(cfg, mesh) if mesh is not None else
                 jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), host))
    params = _device_put_leaf_by_leaf(host, shardings)
    return LoadedModel(cfg, params, tokenizer, kind, step)
  cfg = read_model_config(root)
  from astrollama_jax import lora_base
  record = lora_base.read(root) if kind in ("workdir", "step") else None
  if record is not None:  # adapters: merged into their (re-read) base
    cfg, params = lora_base.load_merged(record, root, params_dir, cfg, mesh, dtype, on_host)
    return LoadedModel(cfg, params, tokenizer, kind, step)
  params = restore_params(params_dir, cfg, mesh, dtype, on_host)
  cfg = cfg.replace(param_dtype=str(np.dtype(params["embed"].dtype)))
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
