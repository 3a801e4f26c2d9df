"""Optional Weights & Biases logging (``log.wandb``), beside TensorBoard and metrics.jsonl.

``wandb`` is an optional extra (``pip install astrollama-jax[wandb]``). The run id is kept in
``WORKDIR/wandb_run_id``, so a resumed run continues the same W&B run (``resume="allow"``).
``WANDB_MODE=offline`` and the other ``WANDB_*`` variables apply as usual.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from astrollama_jax.errors import UserError

RUN_ID_FILE = "wandb_run_id"


def run_id(workdir: str) -> str:
  """The workdir's W&B run id, made (and kept) on first use."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if os.path.exists(path):
    with open(path) as f:
      kept = f.read().strip()
    if kept:
      return kept
  new = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(new + "\n")
  os.replace(tmp, path)
  return new


def start(log: Any, workdir: str, config: dict[str, Any]) -> Any:
  """A W&B run for this training run (``log``: the config's ``log`` section), or None if off."""
  if not log.wandb:
    return None
  try:
    import wandb
  except ImportError:
    raise UserError(
      "--config.log.wandb=True needs the wandb package: pip install 'astrollama-jax[wandb]'"
    ) from None
  return wandb.init(
    project=log.wandb_project,
    name=log.wandb_name or os.path.basename(os.path.abspath(workdir)),
    id=run_id(workdir),
    resume="allow",
    config=config,
    dir=os.environ.get("WANDB_DIR") or workdir,
  )
