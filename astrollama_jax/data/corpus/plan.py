"""Step 2 of a build: every entry's fate (kept, or skipped with a reason), decided before
anything is written, and the records it keeps, streamed (``records``) or in memory
(``collect``)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
import dataclasses
import hashlib
import json
from pathlib import Path
import tempfile

import numpy as np

from astrollama_jax.data.corpus.config import CorpusConfig, Report
from astrollama_jax.data.corpus.metadata import MetaIndex, date_from_id, in_dates, license_patterns
from astrollama_jax.data.corpus.parse import parse_units, read_results
from astrollama_jax.data.corpus.read import SPLITS, UNITS, check_date, record_keys
from astrollama_jax.data.corpus.source_formats import Unit, discover, units_of


def split_of(arxiv_id: str, validation_fraction: float) -> str:
  """Deterministic split from the id: the first 8 bytes of sha256 as a fraction of 2**64."""
  h = int.from_bytes(hashlib.sha256(arxiv_id.encode("utf-8")).digest()[:8], "big")
  return "validation" if h / 2.0**64 < validation_fraction else "train"


@dataclasses.dataclass
class Stored:
  """What an existing dataset version holds, for an update: its units and record keys."""

  ds_dir: Path
  units: list[dict]
  keys: dict[str, dict[str, np.ndarray]]  # split -> {id, section, version, date}

  @classmethod
  def load(cls, ds_dir: Path) -> Stored:
    units = json.loads((ds_dir / UNITS).read_text()) if (ds_dir / UNITS).exists() else []
    return cls(ds_dir, units, record_keys(ds_dir))

  def paper_versions(self) -> dict[str, int]:
    """Per id, the version of its LaTeX records (the abstract's when it has nothing else)."""
    latex_v: dict[str, int] = {}
    abstract_v = self.abstract_versions()
    for k in self.keys.values():
      for pid, section, version in zip(k["id"], k["section"], k["version"]):
        if section != "abstract":
          latex_v[str(pid)] = max(int(version), latex_v.get(str(pid), 0))
    return abstract_v | latex_v

  def abstract_versions(self) -> dict[str, int]:
    return {
      str(p): int(v)
      for k in self.keys.values()
      for p, s, v in zip(k["id"], k["section"], k["version"])
      if s == "abstract"
    }


@dataclasses.dataclass
class Plan:
  """Every entry's fate, decided before anything is written."""

  config: CorpusConfig
  units: list[Unit]
  results: list[Path]
  meta: MetaIndex
  report: Report
  winners: dict[str, tuple[int, int, int]]  # id -> (version, unit, line)
  decisions: dict[tuple[int, int], tuple[str, str]]  # (unit, line) -> (reason, detail)
  meta_abstracts: set[str]  # ids whose abstract comes from metadata
  dropped: dict[str, np.ndarray]  # update: stored record indices to drop
  stored: Stored | None = None

  def is_empty(self) -> bool:
    return not any(sum(v.values()) for v in self.report.records.values())


def _newer(version: int, stored: int) -> bool:
  """Whether a source replaces a stored paper: a higher version, or both unversioned (the
  later unit holds the later upload)."""
  return version > stored or version == stored == 0


def make_plan(config: CorpusConfig, work: Path, stored: Stored | None = None) -> Plan:
  """Discover, parse (resumable, under ``work``) and decide; see the package docstring."""
  check_date(config.since, "--since")
  check_date(config.until, "--until")
  found = discover(config.sources)
  jsonl_files = [s.path for s in found if s.is_metadata]
  report = Report()
  units = units_of(found)
  report.units_seen = len(units)
  if stored is not None:
    done = {(u["name"], u["size"]) for u in stored.units}
    new = [u for u in units if (u.name, u.size()) not in done]
    report.units_already_in_corpus = len(units) - len(new)
    units = new
  results = parse_units(units, config, work, report)

  latex_ids: set[str] = set()
  for path in results:
    latex_ids.update(r["id"] for r, _ in read_results(path))
  jsonl_skip: collections.Counter = collections.Counter()
  meta = MetaIndex(jsonl_files, config, latex_ids, report, jsonl_skip)
  licenses = license_patterns(config.licenses)
  stored_papers = stored.paper_versions() if stored else {}
  stored_abstracts = stored.abstract_versions() if stored else {}

  skip_count: collections.Counter = collections.Counter()
  decisions: dict[tuple[int, int], tuple[str, str]] = {}
  winners: dict[str, tuple[int, int, int, tuple[str, ...]]] = {}
  for u, path in enumerate(results):
    for line, (r, _) in enumerate(read_results(path)):
      report.papers_seen += 1
      if "reason" in r:
        skip_count[r["reason"]] += 1
        continue
      pid, version = r["id"], r["version"]
      m = meta.by_id.get(pid)
      reason = detail = ""
      if m is not None and m.verdict:
        reason, detail = (
          m.verdict,
          ("" if m.verdict != "category" else "not " + ",".join(config.categories)),
        )
      elif m is None and licenses:
        reason, detail = "license", "no metadata names its licence"
      elif m is None and not in_dates(date_from_id(pid), config.since, config.until):
        reason, detail = "date_range", "no metadata; date from the id"
      elif pid in stored_papers and not _newer(version, stored_papers[pid]):
        reason, detail = "already_in_corpus", f"v{stored_papers[pid]} is in the dataset"
      if reason:
        skip_count[reason] += 1
        decisions[(u, line)] = (reason, detail)
        continue
      old = winners.get(pid)
      if old is not None:
        loser = (old[1], old[2], old[0]) if version > old[0] else (u, line, version)
        skip_count["older_version"] += 1
        decisions[loser[:2]] = ("older_version", f"v{loser[2]}")
        if version <= old[0]:
          continue
      winners[pid] = (version, u, line, tuple(r["sections"]))
  report.papers_kept = len(winners)
  report.papers_skipped = {k: v for k, v in skip_count.items() if v}
  report.sections_found = dict(collections.Counter(n for w in winners.values() for n in w[3]))
  report.papers_without_metadata = sum(1 for pid in winners if pid not in meta.by_id)
  replaced = {pid for pid in winners if pid in stored_papers}
  report.papers_replaced = len(replaced)

  # Which metadata abstracts become records, and what every split holds.
  meta_abstracts: set[str] = set()
  for pid, m in meta.by_id.items():
    reason = m.verdict
    if not reason and not m.categories and pid not in winners:
      reason = "no_categories"
    elif not reason and not m.has_abstract:
      reason = "no_abstract"
    elif (
      not reason
      and pid in stored_abstracts
      and pid not in replaced
      and m.version <= stored_abstracts[pid]
    ):
      reason = "already_in_corpus"
    if reason:
      if reason != "category" or pid in latex_ids:
        jsonl_skip[reason] += 1
      continue
    meta_abstracts.add(pid)
  report.jsonl_records_kept = len(meta_abstracts)
  report.latex_abstracts_replaced = sum(
    1 for pid, w in winners.items() if "abstract" in w[3] and pid in meta_abstracts
  )
  report.jsonl_skipped = {k: v for k, v in jsonl_skip.items() if v}
  counts: dict[str, collections.Counter] = {s: collections.Counter() for s in SPLITS}
  for pid, w in winners.items():
    counts[split_of(pid, config.validation_fraction)].update(
      n for n in w[3] if not (n == "abstract" and pid in meta_abstracts)
    )
  for pid in meta_abstracts:
    counts[split_of(pid, config.validation_fraction)]["abstract"] += 1

  dropped: dict[str, np.ndarray] = {}
  if stored is not None:
    for split, k in stored.keys.items():
      ids = k["id"].astype(str)
      drop = np.isin(ids, sorted(replaced))
      drop |= (k["section"].astype(str) == "abstract") & np.isin(ids, sorted(meta_abstracts))
      dropped[split] = np.flatnonzero(drop)
    report.records_dropped = int(sum(len(v) for v in dropped.values()))
  report.records = {s: dict(c) for s, c in counts.items()}
  return Plan(
    config,
    units,
    results,
    meta,
    report,
    {pid: w[:3] for pid, w in winners.items()},
    decisions,
    meta_abstracts,
    dropped,
    stored,
  )


def stream_records(plan: Plan, split: str | None = None) -> Iterator[dict]:
  """The records of ``split`` (all splits if None), streamed from results and metadata."""
  frac = plan.config.validation_fraction
  for u, path in enumerate(plan.results):
    for line, (r, texts) in enumerate(read_results(path)):
      pid = r["id"]
      w = plan.winners.get(pid)
      if w is None or w[1:] != (u, line) or (split and split_of(pid, frac) != split):
        continue
      m = plan.meta.by_id.get(pid)
      for name, text in json.loads(texts).items():
        if name == "abstract" and pid in plan.meta_abstracts:
          continue
        yield {
          "id": pid,
          "title": (m.title if m else "") or r["title"],
          "date": m.date if m else date_from_id(pid),
          "section": name,
          "text": text,
          "license": m.license if m else "",
          "version": r["version"],
        }
  wanted = {p for p in plan.meta_abstracts if not split or split_of(p, frac) == split}
  for pid, abstract in plan.meta.abstracts(wanted):
    m = plan.meta.by_id[pid]
    yield {
      "id": pid,
      "title": m.title,
      "date": m.date,
      "section": "abstract",
      "text": abstract,
      "license": m.license,
      "version": m.version,
    }


def manifest_entries(plan: Plan) -> tuple[Iterator[dict], Iterator[dict]]:
  """(skipped entries, kept papers) for the manifest, streamed in unit and line order."""

  def skipped() -> Iterator[dict]:
    for u, path in enumerate(plan.results):
      for line, (r, _) in enumerate(read_results(path)):
        if "reason" in r:
          yield {k: r[k] for k in ("id", "source", "reason", "detail")}
        elif (u, line) in plan.decisions:
          reason, detail = plan.decisions[(u, line)]
          yield {"id": r["id"], "source": r["source"], "reason": reason, "detail": detail}

  def papers() -> Iterator[dict]:
    for u, path in enumerate(plan.results):
      for line, (r, _) in enumerate(read_results(path)):
        w = plan.winners.get(r["id"])
        if w is not None and w[1:] == (u, line):
          yield {
            k: r[k] for k in ("id", "version", "source", "main_file", "missing_inputs", "sections")
          }

  return skipped(), papers()


@dataclasses.dataclass
class Collected:
  records: dict[str, list[dict]]  # split -> records sorted by (id, section)
  report: Report
  skipped: list[dict]  # every skipped entry: id, source, reason, detail
  papers: list[dict]  # every kept paper: id, source, main file, section spans


def collect(config: CorpusConfig) -> Collected:
  """Read every source and return the deduplicated, split records plus the report, in memory
  (for small inputs and tests; ``build`` streams instead)."""
  with tempfile.TemporaryDirectory(prefix="astro_corpus_work") as work:
    plan = make_plan(config, Path(work))
    by_split = {
      s: sorted(stream_records(plan, s), key=lambda r: (r["id"], r["section"])) for s in SPLITS
    }
    skipped, papers = (list(x) for x in manifest_entries(plan))
  return Collected(by_split, plan.report, skipped, sorted(papers, key=lambda p: p["id"]))
