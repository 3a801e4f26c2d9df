"""The one way to load a model: any model path -> ``LoadedModel``, with one policy.

``load_model`` reads every kind ``locate`` knows (HF folder, converted DIR, training WORKDIR,
step folder), and a LoRA workdir as its base with the adapters merged in. Every command and
library caller loads through it, so what the shared flags mean is decided here once:

* ``dtype``: the parameters are cast to it (default: the stored dtype); the returned
  ``cfg.param_dtype`` is always the dtype of the returned parameters;
* ``compute_dtype``: the activations' dtype (default: the parameters' dtype, so a float32
  checkpoint computes in float32);
* ``attention``: replaces the stored config's attention implementation;
* ``tokenizer``: replaces the checkpoint's own tokenizer; with ``need_tokenizer`` a
  model without one is refused before any parameter is read.

Where the parameters go: onto ``mesh`` (default: the first device); with ``on_host`` they are
numpy arrays; with ``lazy`` an Orbax checkpoint's or an HF folder's parameters stay on disk as
``reader.StoredArray``s or ``hf.HFStackedArray``s, read layer by layer by whoever walks them
(export's and merge's memory bound), while a LoRA workdir is read whole onto the host.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, SingleDeviceSharding
import numpy as np

from astrollama_jax.checkpoints import lora_base, reader
from astrollama_jax.checkpoints.layout import Params, check_dtype, release_memory, tokenizer_in
from astrollama_jax.checkpoints.locate import Location, locate, read_model_config
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.errors import UserError
from astrollama_jax.formats import hf
from astrollama_jax.model import llama, lora
from astrollama_jax.model.config import LlamaConfig


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: its config (``param_dtype`` = the dtype of ``params``, the compute
  dtype and attention the caller asked for), its parameters, and where they came from."""

  cfg: LlamaConfig
  params: Params
  tokenizer_path: str | None
  kind: str = ""  # "hf", "converted", "workdir" or "step"
  step: int | None = None
  mesh: Mesh | None = None  # the mesh the parameters are sharded over (None: one device, host)
  checkpoint: str = ""  # the path as given

  def open_tokenizer(self) -> Tokenizer:
    """The model's tokenizer, checked to fit the model's vocabulary."""
    if not self.tokenizer_path:
      raise UserError(
        f"{self.checkpoint} has no tokenizer.model or tokenizer.json; pass --tokenizer=PATH"
      )
    tokenizer = Tokenizer(self.tokenizer_path)
    tokenizer.check_vocab(self.cfg.vocab_size)
    return tokenizer


def load_model(
  path: str,
  mesh: Mesh | None = None,
  *,
  dtype: str | None = None,
  compute_dtype: str | None = None,
  attention: str | None = None,
  tokenizer: str | None = None,
  need_tokenizer: bool = False,
  on_host: bool = False,
  lazy: bool = False,
) -> LoadedModel:
  """Load the model at ``path`` with the policy of the module docstring."""
  dtype, compute_dtype = check_dtype(dtype), check_dtype(compute_dtype)
  where = locate(path)
  tok = _tokenizer(str(path), where.root, tokenizer, need_tokenizer)
  host = on_host or lazy
  cfg, params = _read(where, mesh, dtype, host, lazy)
  cfg = cfg.replace(compute_dtype=compute_dtype or cfg.param_dtype)
  if attention:
    cfg = cfg.replace(attention_impl=attention)
  if host:
    release_memory()  # what reading left in glibc's arenas: export needs the room next
  logging.info(
    "loaded %s (%s): %.1fM params, %s params, %s compute, %s attention",
    path,
    where.kind,
    cfg.num_params() / 1e6,
    cfg.param_dtype,
    cfg.compute_dtype,
    cfg.attention_impl,
  )
  return LoadedModel(cfg, params, tok, where.kind, where.step, None if host else mesh, str(path))


def tokenizer_path(checkpoint: str, explicit: str | None = None) -> str | None:
  """The tokenizer a load of ``checkpoint`` would use: ``explicit``, else its own, else None."""
  return _tokenizer(str(checkpoint), locate(str(checkpoint)).root, explicit, False)


def _tokenizer(path: str, root: str, explicit: str | None, needed: bool) -> str | None:
  """``explicit`` (which must exist), else the checkpoint's own tokenizer if any."""
  if explicit:
    if not os.path.isfile(explicit):
      raise UserError(f"tokenizer {explicit} does not exist")
    return explicit
  own = tokenizer_in(root)
  if own:
    return own
  if needed:
    raise UserError(f"{path} has no tokenizer.model or tokenizer.json; pass --tokenizer=PATH")
  return None


def _read(
  where: Location, mesh: Mesh | None, dtype: str | None, on_host: bool, lazy: bool
) -> tuple[LlamaConfig, Params]:
  """(config with ``param_dtype`` = the dtype read, parameters) of a located model."""
  if where.kind == "hf" and lazy:
    return hf.open_hf_params(where.root, dtype)
  if where.kind == "hf":
    cfg, params = hf.load_hf(where.root, dtype=dtype)
    cfg = cfg.replace(param_dtype=str(np.dtype(params["embed"].dtype)))
    if not on_host:
      params = _device_put_leaf_by_leaf(params, _shardings(cfg, mesh))
    return cfg, params
  cfg = read_model_config(where.root)
  record = lora_base.read(where.root) if where.kind in ("workdir", "step") else None
  if record is not None:
    return _merged(record, where, cfg, mesh, dtype, on_host)
  if lazy:
    params = reader.open_params(where.params_dir, cfg, dtype)
  else:
    params = reader.restore_params(where.params_dir, cfg, mesh, dtype, on_host)
  return cfg.replace(param_dtype=str(np.dtype(params["embed"].dtype))), params


def _merged(
  record: dict[str, Any],
  where: Location,
  cfg: LlamaConfig,
  mesh: Mesh | None,
  dtype: str | None,
  on_host: bool,
) -> tuple[LlamaConfig, Params]:
  """(the base's config, its parameters with a LoRA workdir's adapters merged in).

  The base is re-read where the record says (checked by fingerprint) in its stored dtype (or
  ``dtype``); every targeted weight becomes ``W + (alpha / rank) * A @ B`` (float32 arithmetic,
  cast back to W's dtype); every other weight is the base's, bit for bit.
  """
  spec = record["spec"]
  adapters = lora_base.restore_adapters(where.params_dir)
  path = lora_base.check_base(record, where.root)
  if path is not None:
    base_cfg, params = _read(locate(path), mesh, dtype, on_host, lazy=False)
  else:  # a random base: rebuilt from its seed, in the run's base dtype
    params = llama.init_params(cfg, seed=record["base"]["seed"])
    params = jax.tree.map(lambda x: np.asarray(x.astype(dtype or record["base_dtype"])), params)
    base_cfg = cfg.replace(param_dtype=str(np.dtype(params["embed"].dtype)))
    if not on_host:
      params = jax.device_put(
        params, llama.param_shardings(base_cfg, mesh) if mesh is not None else jax.devices()[0]
      )
  if on_host:
    merged = lora.merge(params, adapters, spec)
    merged = jax.tree.map(lambda new, old: old if new is old else np.asarray(new), merged, params)
    return base_cfg, merged
  shardings = jax.tree.map(lambda x: x.sharding, params)
  merged = jax.jit(
    lambda p, a: lora.merge(p, a, spec), out_shardings=shardings, donate_argnums=(0,)
  )(params, adapters)
  return base_cfg, merged


def _shardings(cfg: LlamaConfig, mesh: Mesh | None) -> Params:
  """The parameters' shardings on ``mesh``, or the first device for every leaf."""
  if mesh is not None:
    return llama.param_shardings(cfg, mesh)
  device = SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, llama.param_shapes(cfg))


def _device_put_leaf_by_leaf(host: Params, shardings: Params) -> Params:
  """Move numpy leaves to devices one at a time, dropping each host copy as it goes."""
  out: Params = {}
  for key in list(host):
    if isinstance(host[key], dict):
      out[key] = _device_put_leaf_by_leaf(host[key], shardings[key])
    else:
      out[key] = jax.device_put(host.pop(key), shardings[key])
  return out


def recorded_chat_template(checkpoint: str) -> str | None:
  """The chat template ``checkpoint`` was trained or exported with, by name, or None.

  A training WORKDIR (or one of its steps) records it in its ``config.json`` when it trained on
  chat data (``data.sft.chat_template``); an HF folder in ``tokenizer_config.json`` as a Jinja
  string, recognised among ``chat_templates.TEMPLATES``. Anything else records none.
  """
  from astrollama_jax.data import chat_templates

  kind, root, _, _ = locate(checkpoint)
  if kind in ("workdir", "step"):
    config = _read_json(os.path.join(root, "config.json"))
    data = config.get("data") or {}
    return (data.get("sft") or {}).get("chat_template") if data.get("kind") == "sft" else None
  if kind == "hf":
    config = _read_json(os.path.join(root, "tokenizer_config.json"))
    template = chat_templates.by_jinja(config.get("chat_template"))
    return template.name if template else None
  return None


def _read_json(path: str) -> dict[str, Any]:
  """The JSON object in ``path``; {} when there is none (the file is optional)."""
  import json

  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}
  return obj if isinstance(obj, dict) else {}
