"""How every command closes: a fixed-width table for people, then one JSON line for scripts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
from typing import Any


def _cell(key: str, value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return "" if value is None else str(value)
  if isinstance(value, int) and "bytes" in key:
    return f"{value:,} ({value / 1024**3:.2f} GiB)"
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(jsonable(value), ensure_ascii=False)
  return str(value)


def _numeric(text: str) -> bool:
  """A cell that is a number (or a byte count with its GiB), right-aligned in tables."""
  head = text.split(" (", 1)[0] if text.endswith(" GiB)") else text
  try:
    float(head.replace(",", ""))
    return True
  except ValueError:
    return False


def format_table(
  rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, header: bool = True
) -> str:
  """A fixed-width text table of ``rows`` (dicts, or sequences in the order of ``columns``):
  numbers right-aligned to 4 decimals."""
  if not rows:
    return "(no rows)"
  columns = list(columns or rows[0].keys())
  rows = [r if isinstance(r, Mapping) else dict(zip(columns, r)) for r in rows]
  cells = [[_cell(c, r.get(c)) for c in columns] for r in rows]
  widths = [
    max(len(c) if header else 0, *(len(row[i]) for row in cells)) for i, c in enumerate(columns)
  ]
  head = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
  rule = "  ".join("-" * w for w in widths)
  body = [
    "  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths))
    for row in cells
  ]
  return "\n".join(([head, rule] if header else []) + body)


def jsonable(value: Any) -> Any:
  """numpy scalars and arrays, tuples and paths as plain JSON values (NaN and inf as null)."""
  import numpy as np

  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return None if math.isnan(value) or math.isinf(value) else value
  if isinstance(value, (str, int, bool)) or value is None:
    return value
  return str(value)


def report(
  title: str,
  summary: Mapping[str, Any],
  rows: Sequence[Mapping[str, Any]] | None = None,
  columns: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Close a command: ``title``, a table (``rows``, else the summary's keys and values), then
  ``summary`` as one JSON line, the last line of stdout, which scripts parse. Returns it."""
  summary = jsonable(dict(summary))
  if rows is None:
    pairs = [{"key": k, "value": _cell(k, v)} for k, v in summary.items()]
    print(f"{title}\n{format_table(pairs, header=False)}")
  else:
    print(f"{title}\n{format_table(rows, columns)}")
  print(json.dumps(summary, ensure_ascii=False), flush=True)
  return summary
