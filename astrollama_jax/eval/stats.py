"""Uncertainty for evaluation numbers: bootstrap intervals and intervals for accuracies.

Evaluation sets here are small (hundreds to a few thousand items), so a point estimate
alone says little when comparing base, CPT and SFT checkpoints. Perplexity is a ratio of
sums over documents (token-weighted), so its interval comes from resampling documents,
not tokens: tokens within a document are not independent.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def bootstrap_ci(
  stat: Callable[[np.ndarray], np.ndarray],
  n: int,
  n_boot: int = 1000,
  seed: int = 0,
  level: float = 0.95,
  chunk: int = 100,
) -> tuple[float, float]:
  """Percentile bootstrap interval of ``stat`` over ``n`` items.

  ``stat`` takes an int array of resampled item indices of shape [k, n] and returns the
  statistic for each of the k resamples ([k]); resamples are drawn ``chunk`` at a time so
  memory stays at chunk x n indices.
  """
  if n == 0 or n_boot <= 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  values = []
  for start in range(0, n_boot, chunk):
    k = min(chunk, n_boot - start)
    values.append(np.asarray(stat(rng.integers(0, n, size=(k, n))), np.float64))
  values = np.concatenate(values)
  alpha = (1.0 - level) / 2
  lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
  return float(lo), float(hi)


def perplexity_ci(
  nll_sums: np.ndarray, token_counts: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
  """95% bootstrap interval of the token-weighted perplexity exp(sum nll / sum tokens)."""
  nll = np.asarray(nll_sums, np.float64)
  tok = np.asarray(token_counts, np.float64)

  def stat(idx):
    return np.exp(nll[idx].sum(1) / np.maximum(tok[idx].sum(1), 1.0))

  return bootstrap_ci(stat, len(nll), n_boot, seed)


def mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
  """95% bootstrap interval of a mean (e.g. cosine similarities)."""
  v = np.asarray(values, np.float64)
  return bootstrap_ci(lambda idx: v[idx].mean(1), len(v), n_boot, seed)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval for a proportion (well behaved near 0 and 1, unlike the normal one).

  ``successes`` may be fractional (ties give partial credit); the formula only needs p and n.
  """
  if n <= 0:
    return float("nan"), float("nan")
  p = successes / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def normal_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
  """The textbook normal-approximation interval p +- z sqrt(p(1-p)/n), clipped to [0, 1]."""
  if n <= 0:
    return float("nan"), float("nan")
  p = successes / n
  half = z * math.sqrt(p * (1 - p) / n)
  return max(0.0, p - half), min(1.0, p + half)
