"""Side-by-side comparison of eval results (e.g. base vs CPT vs SFT): a markdown table and a chart.

Each input is a result file written by a task (``<output>/<task>.json``) or a directory
of them (all tasks of one checkpoint, merged into one run). A run is named by the ``label``
stored in its results. Metrics are matched by name; where a task stored a 95% interval
(``<m>_lo``/``<m>_hi`` or ``<m>/lo``/``<m>/hi``) the table shows it and the chart draws it
as an error bar.
"""

from __future__ import annotations

from collections.abc import Sequence
import glob
import json
import math
import os

from astrollama_jax.eval import common
from astrollama_jax.util import tables

_BOUND_SUFFIXES = ("_lo", "_hi", "/lo", "/hi")
_SKIP = {"embed/count"}


def _read(path: str) -> list[dict]:
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "*.json")))
    if not files:
      raise common.EvalDataError(f"{path}: no result .json files in this directory")
  elif os.path.isfile(path):
    files = [path]
  else:
    raise common.EvalDataError(f"no such result file or directory: {path}")
  out = []
  for f in files:
    try:
      with open(f, encoding="utf-8") as fh:
        res = json.load(fh)
    except json.JSONDecodeError as e:
      raise common.EvalDataError(f"{f}: not a JSON result file ({e.msg})") from None
    if not isinstance(res, dict) or not isinstance(res.get("metrics"), dict):
      if os.path.isdir(path):
        continue  # another JSON that happens to live there
      raise common.EvalDataError(f"{f}: not an eval result (no 'metrics')")
    out.append(res)
  if not out:
    raise common.EvalDataError(f"{path}: no eval results found")
  return out


def load_runs(specs: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
  """(label, merged metrics) per input; duplicate labels get the input's name appended."""
  runs, seen = [], set()
  for spec in specs:
    results = _read(spec)
    label = results[0].get("label") or common.corpus_name(spec)
    if label in seen:
      label = f"{label} ({common.corpus_name(spec)})"
    seen.add(label)
    metrics: dict[str, float] = {}
    for res in results:
      metrics.update(
        {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float)) or v is None}
      )
    runs.append((label, metrics))
  return runs


def interval(metrics: dict, name: str) -> tuple[float, float] | None:
  for lo, hi in ((f"{name}_lo", f"{name}_hi"), (f"{name}/lo", f"{name}/hi")):
    if metrics.get(lo) is not None and metrics.get(hi) is not None:
      return float(metrics[lo]), float(metrics[hi])
  return None


def metric_names(runs: Sequence[tuple[str, dict]]) -> list[str]:
  names: list[str] = []
  for _, m in runs:
    for k in m:
      if k not in names and k not in _SKIP and not k.endswith(_BOUND_SUFFIXES):
        names.append(k)
  return names


def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
    return str(int(v))
  return f"{v:.4g}"


def markdown(runs: Sequence[tuple[str, dict]], names: Sequence[str]) -> str:
  lines = [
    "| metric | " + " | ".join(label for label, _ in runs) + " |",
    "|---|" + "---:|" * len(runs),
  ]
  for name in names:
    cells = []
    for _, m in runs:
      v = m.get(name)
      ci = interval(m, name)
      cells.append(_fmt(v) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and v is not None else ""))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def chart(runs: Sequence[tuple[str, dict]], names: Sequence[str], path: str) -> None:
  """One bar panel per metric, one bar per run, 95% intervals as error bars."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = min(3, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, name in zip(axes.flat, names):
    xs, ys, errs = [], [], [[], []]
    for i, (_, m) in enumerate(runs):
      v = m.get(name)
      if v is None:
        continue
      ci = interval(m, name) or (v, v)
      xs.append(i)
      ys.append(v)
      errs[0].append(max(0.0, v - ci[0]))
      errs[1].append(max(0.0, ci[1] - v))
    has_ci = any(e > 0 for side in errs for e in side)
    ax.bar(
      xs, ys, yerr=errs if has_ci else None, capsize=4, color=[colors[i % len(colors)] for i in xs]
    )
    ax.set_xticks(
      range(len(runs)), [label for label, _ in runs], rotation=20, ha="right", fontsize=8
    )
    ax.set_title(name, fontsize=9)
  for ax in list(axes.flat)[len(names) :]:
    ax.axis("off")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def run(specs: Sequence[str], out_prefix: str) -> dict:
  """The ``--compare`` command: write ``<out_prefix>.md`` and ``<out_prefix>.png``."""
  specs = common.split_specs(list(specs))
  if len(specs) < 1:
    raise ValueError("--compare needs at least one result file or directory")
  runs = load_runs(specs)
  names = metric_names(runs)
  if not names:
    raise common.EvalDataError(f"no metrics in {specs}")
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  md_path, png_path = out_prefix + ".md", out_prefix + ".png"
  with open(md_path + ".tmp", "w", encoding="utf-8") as f:
    f.write(markdown(runs, names))
  os.replace(md_path + ".tmp", md_path)
  chart(runs, names, png_path)
  rows = [{"metric": n, **{label: m.get(n) for label, m in runs}} for n in names]
  summary = {
    "task": "compare",
    "runs": [label for label, _ in runs],
    "inputs": specs,
    "metrics": {label: {n: m.get(n) for n in names} for label, m in runs},
    "files": {"markdown": md_path, "chart": png_path},
  }
  return tables.report("compare", summary, rows)
