"""The benchmark's report: JAX beside the reference in one table, then the summary as JSON.

Every figure is printed with what it was measured in (dtypes, optimizer, remat) and the software
versions, so a number can be set beside another only where the two compute alike.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

from astrollama_jax.util import tables


def versions() -> dict:
  """Python, JAX and jaxlib, and those of flax, optax, torch, transformers already imported."""
  import jax
  import jaxlib

  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
  for mod in ("flax", "optax", "torch", "transformers"):
    if mod in sys.modules:
      out[mod] = sys.modules[mod].__version__
  return out


def _fmt(v: Any) -> str:
  return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(side: dict) -> str:
  """One cell: what a side computes in (weights, compute, optimizer moments)."""
  out = f"params {side.get('param_dtype')}, compute {side.get('compute_dtype')}"
  if side.get("autocast"):
    out += " (autocast)"
  if side.get("moments_dtype"):
    out += f", moments {side['moments_dtype']}"
  return out


def report(summary: dict) -> None:
  """The headline numbers, JAX beside the reference when there is one, then the JSON line."""
  ref = summary.get("reference")
  ours = summary.get("computes", {})
  keys = ["step_time_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gb", "error"]
  if summary["task"] == "decode":
    keys = ["time_s", "prefill_s", "tokens_per_s", "decode_tokens_per_s", "peak_memory_gb", "error"]
  rows = [("computes in", describe(ours), describe(ref) if ref else "")]
  if summary["task"] == "train":
    rows.append(
      (
        "optimizer / remat",
        f"{ours.get('optimizer')} / {ours.get('remat')}",
        f"{ref.get('optimizer')} / {ref.get('remat')}" if ref else "",
      )
    )
  rows += [
    (k, _fmt(summary.get(k)), _fmt(ref.get(k)) if ref else "")
    for k in keys
    if k != "error" or summary.get(k) or (ref or {}).get(k)
  ]
  if "tokens_identical" in summary:
    rows.append(
      (
        "same greedy tokens",
        f"{'yes' if summary['tokens_identical'] else 'no'}: {summary['rows_identical']} of "
        f"{summary['batch']} rows, common prefix {summary['common_prefix_fraction']:.1%}",
        "",
      )
    )
  if summary.get("speedup_vs_reference") is not None:
    rows.append(("jax / torch tokens/s", f"{summary['speedup_vs_reference']:.3f}", ""))
  for m in summary.get("reference_mismatches") or ():
    rows.append(("not like for like, no ratio", m, ""))
  tables.report(
    f"bench {summary['task']}: {summary['model']} on {summary['n_devices'] or 1} x "
    f"{summary['device']}",
    summary,
    rows=rows,
    columns=("metric", "jax", "torch" if ref else "-"),
  )
