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
