"""Training metrics on process 0: TensorBoard events, a JSONL log, a progress bar with ETA and,
when ``log.wandb`` is on, a Weights & Biases run (``train/wandb_log.py``).

Other processes get a logger that does nothing, so the loop never branches on the process.
``metrics.jsonl`` is appended to (a resumed run continues the same file); every line is one
JSON object with ``step`` and ``kind`` (train, eval, goodput, batch, event).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import tqdm


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf
  return v


class MetricsLogger:
  """TensorBoard + JSONL + tqdm, active on process 0 only."""

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    start_step: int = 0,
    enabled: bool | None = None,
    progress: bool = True,
    wandb_run: Any = None,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._jsonl = self._bar = None
    self._wandb = wandb_run
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    path = os.path.join(workdir, "metrics.jsonl")
    torn = os.path.exists(path) and os.path.getsize(path) and not _ends_with_newline(path)
    self._jsonl = open(path, "a", buffering=1)
    if torn:  # a killed run left half a line: end it so the next record stays readable
      self._jsonl.write("\n")
    if progress:
      self._bar = tqdm.tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        desc="train",
        mininterval=1.0,
      )

  def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
    """One JSONL line; numeric values also go to TensorBoard as ``kind/name``."""
    if not self.enabled:
      return
    values = {k: _plain(v) for k, v in values.items()}
    self._jsonl.write(
      json.dumps({"step": step, "kind": kind, "time": round(time.time(), 3), **values}) + "\n"
    )
    if kind in ("train", "eval", "goodput"):
      numbers = {
        f"{kind}/{name}": v
        for name, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
      }
      for name, v in numbers.items():
        self._tb.add_scalar(name, v, step)
      if self._wandb is not None:
        self._wandb.log(numbers, step=step)
      if kind == "eval":
        logging.info("step %d eval: %s", step, _fmt(values))

  def advance(self, steps: int, postfix: dict[str, Any] | None = None) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
      self._bar.update(steps)

  def close(self, summary: dict[str, Any] | None = None) -> None:
    """Flush and close every sink; ``summary`` (numbers) becomes the W&B run's summary."""
    if self._wandb is not None:
      if summary:
        self._wandb.summary.update(summary)
      self._wandb.finish()
      self._wandb = None
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.flush()
    self._tb.close()
    self._jsonl.close()


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def quiet_library_logs() -> None:
  """Keep Orbax's per-save INFO chatter out of the console (its warnings and errors stay)."""
  import logging as std_logging

  class _Filter(std_logging.Filter):
    def filter(self, record):
      return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname

  logging.get_absl_handler().addFilter(_Filter())


def _short(v: Any) -> str:
  v = _plain(v)
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt(values: dict[str, Any]) -> str:
  return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl (a torn last line from a kill is ignored)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out
