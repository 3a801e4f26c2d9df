"""The ranges of the training config's numbers, checked before anything is read or compiled.

A value out of range would otherwise run as something else (``checkpoint.every=-3`` saves every
3 steps: Python's ``%`` takes the sign of the divisor) or run for minutes before failing (a NaN
learning rate skips ``train.max_consecutive_nonfinite`` steps, then stops). ``check`` names the
first such key in one line. Keys whose range depends on other values (``train.num_steps``,
``data.shards``, the batch over the mesh) are checked where those are known (``resolve``).
"""

from __future__ import annotations

import math
from typing import Any

# key of the config -> (lowest, highest, whether the highest itself is allowed); None: no bound.
# The lowest is always allowed.
_RANGES: dict[str, tuple[float, float | None, bool]] = {
  "data.seq_len": (1, None, True),
  "data.shards": (0, None, True),
  "data.lm.worker_count": (0, None, True),
  "data.synthetic.num_rows": (1, None, True),
  "data.synthetic.stall_after_steps": (0, None, True),
  "train.global_batch_size": (1, None, True),
  "train.num_epochs": (0, None, True),
  "train.grad_accum_steps": (1, None, True),
  "train.max_consecutive_nonfinite": (1, None, True),
  "train.hang_timeout_s": (0, None, True),
  "optimizer.weight_decay": (0, None, True),
  "optimizer.adam_b1": (0, 1, False),
  "optimizer.adam_b2": (0, 1, False),
  "optimizer.adam_eps": (0, None, True),
  "optimizer.grad_clip_norm": (0, None, True),
  "schedule.learning_rate": (0, None, True),
  "schedule.warmup_ratio": (0, 1, False),
  "schedule.end_lr_ratio": (0, None, True),
  "loss.chunk_size": (0, None, True),
  "eval.every": (0, None, True),
  "eval.batches": (0, None, True),
  "eval.batch_size": (0, None, True),
  "checkpoint.every": (0, None, True),
  "checkpoint.keep": (1, None, True),
  "log.every": (1, None, True),
  "lora.rank": (0, None, True),
  "lora.dropout": (0, 1, False),
}


def _floats(tree: Any, prefix: str = ""):
  """(dotted key, value) of every float in a nested dict/list config."""
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, float):
      yield name, value
    elif isinstance(value, (dict, list, tuple)):
      yield from _floats(value, f"{name}.")


def _get(config: Any, dotted: str) -> Any:
  for key in dotted.split("."):
    config = config[key]
  return config


def check(config: Any) -> None:
  """Raise ``ValueError`` naming the first key whose value is not finite or out of its range."""
  for name, value in _floats(config.to_dict()):
    if not math.isfinite(value):
      raise ValueError(f"config.{name}={value} is not a finite number")
  for name, (low, high, high_allowed) in _RANGES.items():
    value = _get(config, name)
    if value is None:
      continue
    above = high is not None and (value > high or (value == high and not high_allowed))
    if value < low or above:
      if high is None:
        want = f">= {low}"
      else:
        want = f"in [{low}, {high}{']' if high_allowed else ')'}"
      raise ValueError(f"config.{name}={value} is out of range: it must be {want}")
