"""Timing one side of a benchmark: the median of synchronised calls, and the rates it gives.

Shared by the JAX side and the PyTorch reference so that both are timed and turned into
tokens/s, TFLOP/s and MFU by the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import statistics
import time
from typing import Any


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, sync: Callable[[Any], Any]) -> dict:
  """Wall time of ``fn`` per call: ``warmup`` untimed calls, then ``steps`` synchronised ones.

  The median, not the mean: one slow step (a collection, a recompile) says nothing of the rest.
  """
  t0 = time.perf_counter()
  for _ in range(warmup):
    sync(fn())
  warm = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "max_s": max(times),
    "warmup_s": warm,
    "timed_steps": len(times),
  }


def rates(
  flops_per_step: float,
  tokens_per_step: int,
  step_s: float,
  n_devices: int,
  peak_flops: float | None,
) -> dict:
  """tokens/s, TFLOP/s per device and MFU of a step (MFU only where the peak is known)."""
  tflops = flops_per_step / step_s / n_devices / 1e12
  return {
    "tokens_per_s": tokens_per_step / step_s,
    "tflops_per_device": tflops,
    "mfu": None if not peak_flops else tflops * 1e12 / peak_flops,
  }


def decode_rates(full_s: float, first_s: float, batch: int, new_tokens: int) -> dict:
  """End-to-end generated tokens/s, and the per-token rate once the prompt is in (prefill).

  ``first_s`` is the time to make one token, so ``full_s - first_s`` is the decoding alone.
  """
  steady = full_s - first_s
  return {
    "time_s": full_s,
    "prefill_s": first_s,
    "tokens_per_s": batch * new_tokens / full_s,
    "decode_tokens_per_s": batch * (new_tokens - 1) / steady if steady > 0 else None,
  }


@dataclasses.dataclass(frozen=True)
class Options:
  """What a benchmark times and how (the ``bench`` command's flags, as the library reads them)."""

  task: str = "train"  # "train" or "decode"
  steps: int = 10  # timed steps (train) or timed generate calls (decode)
  warmup: int = 2  # untimed calls first (the first compiles)
  prompt_len: int = 512  # decode: prompt tokens per row
  new_tokens: int = 256  # decode: generated tokens per row
  reference: str = "none"  # "none", "torch" (beside JAX) or "torch_only"
  peak_tflops: float = 0.0  # device bf16 peak for MFU; 0: look up the device kind
  matmul_probe: int = 0  # N of a bf16 N^3 matmul timed as the achievable TFLOP/s; 0: off
