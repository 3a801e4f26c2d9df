"""Load any checkpoint for inference, with the shared flags' meaning of dtype and attention."""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from astrollama_jax.errors import UserError


def load_model(
  checkpoint: str,
  mesh: Any = None,
  *,
  dtype: str | None = None,
  compute_dtype: str | None = None,
  attention: str | None = None,
  tokenizer: str | None = None,
):
  """Load any checkpoint for inference with the shared flags' meaning.

  Returns ``store.LoadedModel`` whose ``cfg`` computes in ``compute_dtype`` (default: the
  loaded parameters' dtype, i.e. the stored one unless ``dtype`` casts) with ``attention`` (default:
  the stored config's), and whose ``tokenizer_path`` is ``tokenizer`` or the checkpoint's own.
  """
  import dataclasses

  from astrollama_jax.checkpoints import store

  loaded = store.load_model(checkpoint, mesh=mesh, dtype=dtype)
  cfg = loaded.cfg.replace(compute_dtype=compute_dtype or loaded.cfg.param_dtype)
  if attention:
    cfg = cfg.replace(attention_impl=attention)
  tok = tokenizer or loaded.tokenizer_path
  if not tok:
    raise UserError(f"{checkpoint} has no tokenizer.model; pass --tokenizer=PATH")
  if not os.path.isfile(tok):
    raise UserError(f"--tokenizer {tok} does not exist")
  logging.info(
    "loaded %s (%s): %.1fM params, %s params, %s compute, %s attention",
    checkpoint,
    loaded.kind,
    cfg.num_params() / 1e6,
    cfg.param_dtype,
    cfg.compute_dtype,
    cfg.attention_impl,
  )
  return dataclasses.replace(loaded, cfg=cfg, tokenizer_path=tok)


def recorded_chat_template(checkpoint: str) -> str | None:
  """The chat template ``checkpoint`` was trained or exported with, by name, or None.

  A training WORKDIR (or one of its steps) records it in its ``config.json`` when it trained on
  chat data (``data.sft.chat_template``); an HF folder in ``tokenizer_config.json`` as a Jinja
  string, recognised among ``chat_templates.TEMPLATES``. Anything else records none.
  """
  from astrollama_jax.checkpoints import store
  from astrollama_jax.data import chat_templates

  kind, root, _, _ = store.locate(checkpoint)
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
