"""``manifest.json`` and ``units.json``, written beside a dataset version's records.

The manifest is the build's account: its config, the retention report, its units, then every
skipped entry (id, source, reason, detail) and every kept paper (its sections' source spans).
``units.json`` lists every unit the version holds, so that an update reads none of them again.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import json
from pathlib import Path

from astrollama_jax.data.corpus.config import REFERENCE_RETENTION
from astrollama_jax.data.corpus.plan import Plan, manifest_entries
from astrollama_jax.data.corpus.read import MANIFEST, UNITS


def _json_list(f, items: Iterable[dict]) -> None:
  f.write("[")
  for i, item in enumerate(items):
    f.write(("\n " if i == 0 else ",\n ") + json.dumps(item, sort_keys=True))
  f.write("\n]")


def write_manifest(ds_dir: Path, plan: Plan) -> None:
  """``manifest.json`` (config, report, units, then every skipped entry and kept paper,
  streamed) and ``units.json`` (every unit the dataset holds, for the next update)."""
  config = {
    k: (list(v) if isinstance(v, (list, tuple)) else v)
    for k, v in dataclasses.asdict(plan.config).items()
    if k != "progress"
  }
  units = [{"name": u.name, "path": u.path, "bulk": u.bulk, "size": u.size()} for u in plan.units]
  report = {
    k: v for k, v in dataclasses.asdict(plan.report).items() if k != "units_resumed"
  }  # how the work was split over runs is not part of the data
  report |= {"retention": plan.report.retention, "reference_retention": REFERENCE_RETENTION}
  head = {
    "config": config,
    "report": report,
    "units": units,
    "previous_version": plan.stored.ds_dir.name if plan.stored else None,
  }
  skipped, papers = manifest_entries(plan)
  with open(ds_dir / MANIFEST, "w", encoding="utf-8") as f:
    f.write(json.dumps(head, indent=1, sort_keys=True)[:-2] + ',\n "skipped": ')
    _json_list(f, skipped)
    f.write(',\n "papers": ')
    _json_list(f, papers)
    f.write("\n}\n")
  previous = plan.stored.units if plan.stored else []
  (ds_dir / UNITS).write_text(json.dumps(previous + units, indent=1, sort_keys=True) + "\n")


def manifest_head(ds_dir: Path) -> dict:
  """The manifest's config/report/units without reading its (long) entry lists."""
  with open(ds_dir / MANIFEST, encoding="utf-8") as f:
    head = []
    for line in f:
      if line.startswith(' "skipped": '):
        break
      head.append(line)
  text = "".join(head).rstrip().rstrip(",")
  try:
    return json.loads(text + "\n}")
  except json.JSONDecodeError:
    return json.loads((ds_dir / MANIFEST).read_text())
