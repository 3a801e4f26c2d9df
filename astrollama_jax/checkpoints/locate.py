"""What a path holds: which of the four kinds of model folder, and where its parameters are.

* an HF folder (``config.json`` + safetensors), read through ``formats.hf``;
* a converted DIR: ``model_config.json``, the tokenizer (``layout``), ``params/`` (Orbax);
* a training WORKDIR: ``model_config.json``, the tokenizer, ``checkpoints/<step>/params``
  (``train.run_state`` writes the steps; the latest finalized one is taken);
* one step folder ``WORKDIR/checkpoints/<step>``.

A WORKDIR or step folder whose WORKDIR holds ``lora.json`` holds LoRA adapters, not a model:
``lora_base`` reads that record and ``loader`` merges the adapters into their base.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import orbax.checkpoint as ocp

from astrollama_jax.checkpoints.layout import (
  CHECKPOINTS_DIR,
  CONFIG_FILE,
  PARAMS_DIR,
  CheckpointError,
)
from astrollama_jax.model.config import LlamaConfig


class Location(NamedTuple):
  """Where a model path's pieces are: ``kind, root, params_dir, step = locate(path)``."""

  kind: str  # "hf", "converted", "workdir" or "step"
  root: str  # the folder with model_config.json (or an HF folder's config.json)
  params_dir: str | None  # the Orbax params folder (None for an HF folder)
  step: int | None  # the training step (workdir and step folder)


def read_model_config(path: str) -> LlamaConfig:
  """The ``model_config.json`` of the folder ``path``."""
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


def locate(path: str) -> Location:
  """The kind of model folder ``path`` is and where its config and parameters are."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path} is not a directory")
  has = lambda *p: os.path.exists(os.path.join(path, *p))
  if has(CONFIG_FILE) and has(PARAMS_DIR):
    return Location("converted", path, os.path.join(path, PARAMS_DIR), None)
  if has(CONFIG_FILE) and has(CHECKPOINTS_DIR):
    step = _latest_step(os.path.join(path, CHECKPOINTS_DIR))
    return Location(
      "workdir", path, os.path.join(path, CHECKPOINTS_DIR, str(step), PARAMS_DIR), step
    )
  parent = os.path.dirname(path)
  if (
    os.path.basename(parent) == CHECKPOINTS_DIR
    and has(PARAMS_DIR)
    and os.path.isfile(os.path.join(os.path.dirname(parent), CONFIG_FILE))
  ):
    if not _is_step(path):
      raise CheckpointError(f"{path} is not a complete checkpoint step (interrupted save?)")
    return Location(
      "step", os.path.dirname(parent), os.path.join(path, PARAMS_DIR), int(os.path.basename(path))
    )
  if has("config.json") and any(f.endswith(".safetensors") for f in os.listdir(path)):
    return Location("hf", path, None, None)
  raise CheckpointError(
    f"{path} is not a model: expected an HF folder (config.json + *.safetensors), a converted "
    f"DIR ({CONFIG_FILE} + {PARAMS_DIR}/), a training WORKDIR ({CONFIG_FILE} + "
    f"{CHECKPOINTS_DIR}/) or a step folder WORKDIR/{CHECKPOINTS_DIR}/<step>"
  )
