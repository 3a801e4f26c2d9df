"""The astro corpus: arXiv inputs -> section records -> a TFDS ArrayRecord dataset.

Inputs are what arXiv distributes: bulk source tars (``arXiv_src_YYMM_NNN.tar``, members
``YYMM/ID.gz`` or ``YYMM/ID.pdf``), their extracted ``YYMM/`` folders, single LaTeX bundles
and paper folders, and metadata JSON lines (the ``arxiv-metadata-oai-snapshot.json`` file, or
the project's abstracts format). A build runs in three steps:

1. parse: every *unit* (one bulk tar, or the loose bundles of one folder) is parsed entry by
   entry, in parallel over entries, into a result file under ``OUTPUT/.astro_corpus-work/``
   that appears (renamed into place) only once the unit is complete. A build that was killed
   starts again from the units it finished; the result of a unit depends on its bytes only,
   so a resumed build writes the same dataset as an uninterrupted one.
2. plan: the metadata is indexed by id (the winning record per id, not its abstract), joined
   with the parsed papers, and every entry gets its fate: kept, or skipped with a reason.
3. write: ``AstroCorpus`` (a ``tfds.core.GeneratorBasedBuilder``) streams the records out of
   the result files and the metadata, then ``manifest.json`` (the retention report, every
   skipped entry with its id and reason, every kept section's source span),
   ``section_index.npz`` (record indices per split and section) and ``record_keys.npz`` (id,
   section, version and date of every record, for updates and date-bounded mixtures). Records
   are held neither in a list nor in a dict, so memory does not grow with the corpus beyond a
   small per-paper index.

Decisions, so that the same inputs always give the same bytes:
* one record per (arXiv id, section); fields id, title, date, section, text, license, version.
  Ids lose their ``vN`` suffix; among several sources of a paper the highest version wins (a
  tie: the first). Among several metadata records of an id the highest version wins, then the
  latest ``update_date``/``date``, then the first. When both a metadata abstract and a LaTeX
  abstract exist, the metadata one (arXiv's own text) is kept.
* the split is a function of the id alone: sha256(id) as a fraction below
  ``validation_fraction`` means validation. All sections of a paper share a split.
* filters: categories (fnmatch, default ``astro-ph*``; a record is kept if any category
  matches), licences (``licenses``: fnmatch patterns on the metadata's ``license`` URL), dates
  (``since``/``until``, inclusive, on the first submission date; without metadata the month
  the id names). LaTeX papers without metadata are kept unless a licence filter is set (an
  unknown licence is not a redistributable one) and counted as ``no_metadata``.
* updates (``build(..., update=True)``): units already in the dataset are not read again; the
  new records go to new shards of a new dataset version beside the previous one, whose shards
  are hard links; an id already present is skipped unless the update brings a newer version
  (an unversioned source in a later unit counts as newer), whose records then replace the old.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
import contextlib
import dataclasses
import fnmatch
import gzip
import hashlib
import json
import multiprocessing
import os
from pathlib import Path
import re
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer, hashing
from tqdm import tqdm

from astrollama_jax.data import latex, sources
from astrollama_jax.util import diskspace

SPLITS = ("train", "validation")
SECTIONS = latex.SECTION_NAMES
MANIFEST = "manifest.json"
SECTION_INDEX = "section_index.npz"
RECORD_KEYS = "record_keys.npz"
UNITS = "units.json"
WORK_DIR = ".astro_corpus-work"
REFERENCE_RETENTION = 0.90  # share of papers the AstroLLaMA recipe keeps from astro-ph
RESULT_FORMAT = 2  # part of every unit's result key: bump when results change shape
# Licences one may redistribute a derived corpus under (``--licenses=redistributable``).
LICENSE_ALIASES = {
  "redistributable": (
    "*creativecommons.org/licenses/by/*",
    "*creativecommons.org/licenses/by-sa/*",
    "*creativecommons.org/publicdomain/zero/*",
    "*arxiv.org/licenses/assumed-1991-2003/*",
  )
}
_NEW_ID_RE = re.compile(r"^(\d{2})(\d{2})\.\d{4,5}$")
_OLD_ID_RE = re.compile(r"^[a-z-]+(?:\.[A-Z]{2})?/(\d{2})(\d{2})\d{3}$")
_DATE_RE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$")


@dataclasses.dataclass
class CorpusConfig:
  """What to build from: see the module docstring for the rules."""

  sources: Sequence[str]
  categories: Sequence[str] = ("astro-ph*",)
  validation_fraction: float = 0.05
  workers: int = 0  # processes for LaTeX parsing; 0 = in this process
  timeout_s: float = latex.DEFAULT_TIMEOUT_S
  max_bytes: int = sources.DEFAULT_MAX_BYTES  # cap on one paper's TeX text (figures not counted)
  licenses: Sequence[str] = ()  # fnmatch patterns on the licence URL (or aliases); () = any
  since: str = ""  # keep papers first submitted on/after this date (YYYY[-MM[-DD]])
  until: str = ""  # ... and on/before this one
  progress: bool = True


@dataclasses.dataclass
class Report:
  """Retention: what was seen, kept and skipped (by reason)."""

  papers_seen: int = 0  # every source entry: LaTeX, PDF only, bad members, ...
  papers_kept: int = 0
  papers_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  sections_found: dict[str, int] = dataclasses.field(default_factory=dict)
  jsonl_records_seen: int = 0
  jsonl_records_kept: int = 0
  jsonl_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  papers_without_metadata: int = 0  # kept: no metadata record names their id
  latex_abstracts_replaced: int = 0  # a metadata abstract of the same id was kept instead
  records: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split->section->n
  units_seen: int = 0  # bulk tars and folders of loose sources
  units_resumed: int = 0  # parsed by an earlier, interrupted build
  units_already_in_corpus: int = 0  # update: read by an earlier version, not read again
  papers_replaced: int = 0  # update: ids whose older records a newer version replaced
  records_dropped: int = 0  # update: those older records

  @property
  def retention(self) -> float:
    return self.papers_kept / self.papers_seen if self.papers_seen else 0.0

  def rows(self) -> list[tuple[str, str]]:
    """The retention table as (label, value) rows (printed at the end of ``prepare``)."""
    units = f"{self.units_seen}"
    if self.units_resumed:
      units += f"  ({self.units_resumed} resumed)"
    if self.units_already_in_corpus:
      units += f"  ({self.units_already_in_corpus} already in the corpus)"
    kept = (
      f"{self.papers_kept}  ({self.retention:.1%}; the reference recipe keeps "
      f"~{REFERENCE_RETENTION:.0%})"
    )
    rows = [
      ("sources (bulk tars, folders)", units),
      ("papers seen (every source entry)", f"{self.papers_seen}"),
      ("LaTeX papers kept", kept),
    ]
    rows += [(f"  with {name}", f"{self.sections_found.get(name, 0)}") for name in SECTIONS]
    rows += [
      (f"  skipped: {reason}", f"{n}  ({n / max(self.papers_seen, 1):.1%})")
      for reason, n in sorted(self.papers_skipped.items())
    ]
    rows.append(("  kept without metadata", f"{self.papers_without_metadata}"))
    if self.papers_replaced or self.records_dropped:
      replaced = f"{self.papers_replaced} papers, {self.records_dropped} records"
      rows.append(("  replaced by a newer version", replaced))
    rows += [
      ("JSONL records seen", f"{self.jsonl_records_seen}"),
      ("JSONL abstracts kept", f"{self.jsonl_records_kept}"),
    ]
    rows += [(f"  skipped: {reason}", f"{n}") for reason, n in sorted(self.jsonl_skipped.items())]
    for split in SPLITS:
      per = self.records.get(split, {})
      detail = ", ".join(f"{k} {v}" for k, v in sorted(per.items()))
      rows.append((f"records {split}", f"{sum(per.values())}  ({detail})"))
    return rows

  def table(self) -> str:
    return "\n".join(f"{label:32s} {value}" for label, value in self.rows())


# ----------------------------------------------------------------------------- discovery


def discover(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
  """Split source paths into (JSONL files, LaTeX sources); raises on missing/empty input.

  A folder holding ``.tex`` files (and no archives or JSONL) is one paper; any other folder
  is searched (sorted) for ``.jsonl`` and ``arxiv-metadata*.json`` files, bulk tars, bundle
  files (``.pdf`` included: arXiv's papers without source) and paper folders.
  """
  jsonl: list[Path] = []
  bundles: list[Path] = []

  def visit(p: Path, top: bool) -> None:
    if p.is_dir():
      if sources.is_bundle(p):
        bundles.append(p)
        return
      before = len(jsonl) + len(bundles)
      for child in sorted(p.iterdir()):
        if (
          child.is_dir()
          or child.name.endswith((".jsonl",) + sources.BUNDLE_SUFFIXES)
          or (child.name.startswith("arxiv-metadata") and child.name.endswith(".json"))
        ):
          visit(child, False)
      if top and len(jsonl) + len(bundles) == before:
        raise ValueError(f"source folder {p} holds no .jsonl file and no LaTeX source")
    elif p.name.endswith((".jsonl", ".json")):
      if p.stat().st_size == 0:
        raise ValueError(f"source file {p} is empty")
      jsonl.append(p)
    elif sources.is_bundle(p):
      bundles.append(p)
    elif top:
      raise ValueError(
        f"source {p} is neither a .jsonl file, a LaTeX source (.gz, .tar.gz, "
        ".tgz, .tar, .tex), an arXiv bulk tar nor a folder"
      )

  for raw in paths:
    p = Path(raw)
    if not p.exists():
      raise ValueError(f"source does not exist: {p}")
    visit(p, True)
  return jsonl, bundles


@dataclasses.dataclass(frozen=True)
class Unit:
  """What one result file holds: one bulk tar, or the loose sources of one folder."""

  path: str
  bulk: bool
  bundles: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    """How the dataset remembers the unit: a bulk tar by its file name, a folder by its path."""
    return Path(self.path).name if self.bulk else self.path

  def fingerprint(self) -> list:
    """Names, sizes and modification times of everything the unit reads."""

    def stat(p: str) -> list:
      st = os.lstat(p)
      return [p, st.st_size, st.st_mtime_ns]

    if self.bulk:
      return [stat(self.path)]
    out = []
    for b in self.bundles:
      if os.path.isdir(b):
        out += [
          stat(os.path.join(r, n)) for r, _, names in sorted(os.walk(b)) for n in sorted(names)
        ]
      else:
        out.append(stat(b))
    return out

  def size(self) -> int:
    return sum(f[1] for f in self.fingerprint())


def units_of(bundles: Sequence[Path]) -> list[Unit]:
  """Each bulk tar is a unit; other sources are grouped by the folder that holds them."""
  units: list[Unit] = []
  loose: dict[str, list[str]] = {}
  for b in bundles:
    if sources.is_bulk_tar(b):
      units.append(Unit(str(b), True))
    else:
      parent = str(b.parent)
      if parent not in loose:
        loose[parent] = []
        units.append(Unit(parent, False))
      loose[parent].append(str(b))
  return [u if u.bulk else Unit(u.path, False, tuple(loose[u.path])) for u in units]


def category_ok(categories: Sequence[str], patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(c, pat) for c in categories for pat in patterns)


def license_patterns(values: Sequence[str]) -> tuple[str, ...]:
  """``--licenses`` values with aliases (``redistributable``) expanded."""
  out: list[str] = []
  for v in values:
    out += LICENSE_ALIASES.get(v, (v,))
  return tuple(out)


def license_ok(license_url: str, patterns: Sequence[str]) -> bool:
  if not patterns:
    return True
  return any(fnmatch.fnmatchcase(license_url or "none", pat) for pat in patterns)


def split_of(arxiv_id: str, validation_fraction: float) -> str:
  """Deterministic split from the id: the first 8 bytes of sha256 as a fraction of 2**64."""
  h = int.from_bytes(hashlib.sha256(arxiv_id.encode("utf-8")).digest()[:8], "big")
  return "validation" if h / 2.0**64 < validation_fraction else "train"


def date_from_id(arxiv_id: str) -> str:
  """The month an arXiv id names (``2101.00001`` -> 2021-01-01, ``astro-ph/9901001`` ->
  1999-01-01), or "" for an id of another shape."""
  m = _NEW_ID_RE.match(arxiv_id) or _OLD_ID_RE.match(arxiv_id)
  if not m or not 1 <= int(m.group(2)) <= 12:
    return ""
  yy = int(m.group(1))
  year = 2000 + yy if m.re is _NEW_ID_RE or yy < 91 else 1900 + yy
  return f"{year:04d}-{m.group(2)}-01"


def check_date(value: str, flag: str) -> str:
  if value and not _DATE_RE.match(value):
    raise ValueError(f"{flag}={value!r} is not a date YYYY, YYYY-MM or YYYY-MM-DD")
  return value


def in_dates(date: str, since: str, until: str) -> bool:
  """Inclusive bounds on a YYYY-MM-DD date; a bound may be YYYY or YYYY-MM (whole periods)."""
  if not since and not until:
    return True
  if not date:
    return False
  return (not since or date >= since) and (not until or date[: len(until)] <= until)


# ----------------------------------------------------------------------------- parse (resumable)


def _unit_key(unit: Unit, config: CorpusConfig) -> str:
  blob = json.dumps(
    [RESULT_FORMAT, unit.bulk, unit.fingerprint(), config.max_bytes, config.timeout_s]
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _entries(unit: Unit) -> tuple[list[sources.Entry], str]:
  if unit.bulk:
    return sources.bulk_entries(unit.path)
  return [sources.Entry(b) for b in unit.bundles], ""


def _result_line(r: dict) -> str:
  """One entry's result as ``header TAB texts``: the header (id, version, source, reason or
  section titles and spans) is all most passes decode; the texts only the records' pass."""
  texts = {n: s.pop("text") for n, s in r.get("sections", {}).items()}
  return json.dumps(r, sort_keys=True) + "\t" + json.dumps(texts, sort_keys=True) + "\n"


def _read_results(path: Path) -> Iterator[tuple[dict, str]]:
  """(header, texts still as JSON) of every entry of a result file."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      head, _, texts = line.partition("\t")  # JSON escapes tabs: the first one separates
      yield json.loads(head), texts


def parse_units(
  units: Sequence[Unit], config: CorpusConfig, work: Path, report: Report
) -> list[Path]:
  """The result file of every unit, parsing the units that have none yet (see the module
  docstring); a unit's file is complete or absent, never partial."""
  work.mkdir(parents=True, exist_ok=True)
  paths = [work / f"{_unit_key(u, config)}.jsonl.gz" for u in units]
  todo = [(u, p) for u, p in zip(units, paths) if not p.exists()]
  report.units_resumed = len(units) - len(todo)
  if report.units_resumed:
    from absl import logging

    logging.info(
      "%d of %d sources already parsed by an earlier build", report.units_resumed, len(units)
    )
  pool = None
  if config.workers > 0 and todo:
    pool = multiprocessing.get_context("spawn").Pool(config.workers)  # no fork of threads
  try:
    with tqdm(desc="papers", unit="paper", disable=not config.progress) as bar:
      for unit, path in todo:
        entries, error = _entries(unit)
        work_items = [(e, config.timeout_s, config.max_bytes) for e in entries]
        results = (
          pool.imap(latex.result_record, work_items, chunksize=4)
          if pool is not None and len(work_items) > 1
          else map(latex.result_record, work_items)
        )
        tmp = path.with_suffix(".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
          for r in results:  # imap keeps the order: the file is a function of the unit
            f.write(_result_line(r))
            bar.update()
          if error:  # a cut-off or corrupt bulk tar: what came before stays, the rest is this
            f.write(
              _result_line(
                {
                  "id": unit.name,
                  "version": 0,
                  "source": unit.path,
                  "reason": "bad_archive",
                  "detail": error,
                }
              )
            )
        os.replace(tmp, path)
  finally:
    if pool is not None:
      pool.terminate()
  return paths


# ----------------------------------------------------------------------------- metadata index


@dataclasses.dataclass
class _Meta:
  """The winning metadata record of an id, without its abstract (read again when written)."""

  version: int
  updated: str
  loc: tuple[int, int]  # (file index, line number)
  verdict: str  # "" (kept) or the skip reason
  title: str
  date: str
  license: str
  has_abstract: bool
  categories: bool  # it names categories


class MetaIndex:
  """Metadata per id from JSONL files, filtered by the config, in one streaming pass.

  Ids outside the categories are remembered only when a LaTeX source needs the verdict
  (``latex_ids``); the abstracts themselves stay in the files (``abstracts`` re-reads them).
  """

  def __init__(
    self,
    files: Sequence[Path],
    config: CorpusConfig,
    latex_ids: set[str],
    report: Report,
    skipped: collections.Counter,
  ):
    self.files = list(files)
    self.by_id: dict[str, _Meta] = {}
    self._licenses = license_patterns(config.licenses)
    other: set[str] = set()
    for fi, path in enumerate(self.files):
      for lineno, rec in sources.read_jsonl(path, skipped):
        report.jsonl_records_seen += 1
        pid = rec["id"]
        if rec["categories"] and not category_ok(rec["categories"], config.categories):
          if pid in latex_ids:
            self._add(pid, rec, (fi, lineno), "category", skipped)
          elif pid in other:
            skipped["duplicate_id"] += 1
          else:
            other.add(pid)
            skipped["category"] += 1
          continue
        self._add(pid, rec, (fi, lineno), self._verdict(rec, config), skipped)

  def _verdict(self, rec: dict, config: CorpusConfig) -> str:
    if not license_ok(rec["license"], self._licenses):
      return "license"
    if not in_dates(rec["date"] or date_from_id(rec["id"]), config.since, config.until):
      return "date_range"
    return "withdrawn" if rec["withdrawn"] else ""

  def _add(
    self, pid: str, rec: dict, loc: tuple[int, int], verdict: str, skipped: collections.Counter
  ) -> None:
    old = self.by_id.get(pid)
    if old is not None:
      skipped["duplicate_id"] += 1
      if (rec["version"], rec["updated"]) <= (old.version, old.updated):
        return
    self.by_id[pid] = _Meta(
      rec["version"],
      rec["updated"],
      loc,
      verdict,
      rec["title"],
      rec["date"],
      rec["license"],
      bool(rec["abstract"]),
      bool(rec["categories"]),
    )

  def abstracts(self, wanted: set[str]) -> Iterator[tuple[str, str]]:
    """(id, abstract) of the winning records of ``wanted`` ids, in file order."""
    want: dict[tuple[int, int], str] = {self.by_id[i].loc: i for i in wanted}
    for fi, path in enumerate(self.files):
      with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
          pid = want.get((fi, lineno))
          if pid is not None:
            yield pid, sources.normalise_record(json.loads(line))["abstract"]


# ----------------------------------------------------------------------------- stored records


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


# ----------------------------------------------------------------------------- plan


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
  """Discover, parse (resumable, under ``work``) and decide; see the module docstring."""
  check_date(config.since, "--since")
  check_date(config.until, "--until")
  jsonl_files, bundles = discover(config.sources)
  report = Report()
  units = units_of(bundles)
  report.units_seen = len(units)
  if stored is not None:
    done = {(u["name"], u["size"]) for u in stored.units}
    new = [u for u in units if (u.name, u.size()) not in done]
    report.units_already_in_corpus = len(units) - len(new)
    units = new
  results = parse_units(units, config, work, report)

  latex_ids: set[str] = set()
  for path in results:
    latex_ids.update(r["id"] for r, _ in _read_results(path))
  jsonl_skip: collections.Counter = collections.Counter()
  meta = MetaIndex(jsonl_files, config, latex_ids, report, jsonl_skip)
  licenses = license_patterns(config.licenses)
  stored_papers = stored.paper_versions() if stored else {}
  stored_abstracts = stored.abstract_versions() if stored else {}

  skip_count: collections.Counter = collections.Counter()
  decisions: dict[tuple[int, int], tuple[str, str]] = {}
  winners: dict[str, tuple[int, int, int, tuple[str, ...]]] = {}
  for u, path in enumerate(results):
    for line, (r, _) in enumerate(_read_results(path)):
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


def _records(plan: Plan, split: str | None = None) -> Iterator[dict]:
  """The records of ``split`` (all splits if None), streamed from results and metadata."""
  frac = plan.config.validation_fraction
  for u, path in enumerate(plan.results):
    for line, (r, texts) in enumerate(_read_results(path)):
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


def _manifest_entries(plan: Plan) -> tuple[Iterator[dict], Iterator[dict]]:
  """(skipped entries, kept papers) for the manifest, streamed in unit and line order."""

  def skipped() -> Iterator[dict]:
    for u, path in enumerate(plan.results):
      for line, (r, _) in enumerate(_read_results(path)):
        if "reason" in r:
          yield {k: r[k] for k in ("id", "source", "reason", "detail")}
        elif (u, line) in plan.decisions:
          reason, detail = plan.decisions[(u, line)]
          yield {"id": r["id"], "source": r["source"], "reason": reason, "detail": detail}

  def papers() -> Iterator[dict]:
    for u, path in enumerate(plan.results):
      for line, (r, _) in enumerate(_read_results(path)):
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
    records = {s: sorted(_records(plan, s), key=lambda r: (r["id"], r["section"])) for s in SPLITS}
    skipped, papers = (list(x) for x in _manifest_entries(plan))
  return Collected(records, plan.report, skipped, sorted(papers, key=lambda p: p["id"]))


# ----------------------------------------------------------------------------- TFDS builder


class AstroCorpus(tfds.core.GeneratorBasedBuilder):
  """Sections of astro-ph papers: one record per (arXiv id, section).

  Built from local files only (``config.sources``); there is nothing to download.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "abstract / introduction / conclusion records with licence and version."
  }
  # Local files only: no checksums or package metadata to find next to the code. Setting
  # this also stops TFDS from probing the package path, which needs the optional
  # `importlib_resources` module under an editable install.
  code_path = None

  def __init__(self, *, plan: Plan | None = None, **kwargs):
    self._plan = plan
    self._written: dict[str, list[tuple]] = {}  # split -> (key, id, section, version, date)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "title": tfds.features.Text(),
          "date": tfds.features.Text(),
          "section": tfds.features.Text(),
          "text": tfds.features.Text(),
          "license": tfds.features.Text(),
          "version": tfds.features.Scalar(np.int32),
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    if self._plan is None:
      raise ValueError("AstroCorpus is written by corpus.build(CorpusConfig(sources=[...]))")
    return {
      split: self._generate_examples(split)
      for split, per in self._plan.report.records.items()
      if sum(per.values())
    }

  def _generate_examples(self, split):
    seen = self._written.setdefault(split, [])
    for rec in _records(self._plan, split):
      key = f"{rec['id']}/{rec['section']}"
      seen.append((key, rec["id"], rec["section"], int(rec["version"]), rec["date"]))
      yield key, rec

  def _download_and_prepare(self, dl_manager, download_config):
    """The records, then manifest, units and indexes beside them, all in TFDS's temporary
    folder (``self.data_dir`` here), so that the dataset appears complete in one rename or not
    at all: a truncated index or manifest never sits beside finished records."""
    super()._download_and_prepare(dl_manager, download_config)
    self.info.write_to_directory(self.data_dir)  # so the records can be read back for the index
    ds_dir = Path(self.data_dir)
    write_manifest(ds_dir, self._plan)
    _save_indexes(ds_dir, written_record_keys(ds_dir, self._written))


class _LocalFiles:
  """The part of ``tf.io.gfile`` (and ``tf.errors``) TFDS's shuffler uses when it spills to
  disk, on local files: TFDS works without TensorFlow except on that path, so a corpus whose
  records outgrow the shuffler's memory buffer would otherwise fail to import TensorFlow."""

  class errors:  # mirrors tf.errors
    class ResourceExhaustedError(Exception):
      message = ""

  class io:  # mirrors tf.io
    class gfile:  # mirrors tf.io.gfile
      GFile = staticmethod(open)
      exists = staticmethod(os.path.exists)
      remove = staticmethod(os.remove)


@contextlib.contextmanager
def _deterministic_protos():
  """Serialize tf.train.Example with sorted map keys while the dataset is written.

  TFDS calls ``SerializeToString()``; the protobuf runtime then writes the feature map in
  hash-table order, which changes from process to process, so two runs on the same input
  would write different bytes. ``deterministic=True`` sorts the keys. Also: TFDS's shuffler
  (records are ordered by a hash of their key, whatever order they are generated in) keeps up
  to 1 GB in memory before it spills to 1000 bucket files; 16 MiB keeps a build's memory flat,
  and the spill goes through local files (``_LocalFiles``) rather than TensorFlow.
  """
  from tensorflow_datasets.core import shuffle

  cls = example_serializer.ExampleSerializer
  original, buffer, files = cls.serialize_example, shuffle.MAX_MEM_BUFFER_SIZE, shuffle.tf

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  shuffle.MAX_MEM_BUFFER_SIZE = min(buffer, 16 << 20)
  shuffle.tf = _LocalFiles
  try:
    yield
  finally:
    cls.serialize_example = original
    shuffle.MAX_MEM_BUFFER_SIZE = buffer
    shuffle.tf = files


def _skip_summary(report: Report) -> str:
  reasons = sorted(report.papers_skipped.items()) + [
    (f"metadata {k}", v) for k, v in sorted(report.jsonl_skipped.items())
  ]
  return "skipped: " + (", ".join(f"{k} {v}" for k, v in reasons) or "nothing")


def _write_tfds(plan: Plan, data_dir: Path) -> AstroCorpus:
  builder = AstroCorpus(plan=plan, data_dir=os.fspath(data_dir))
  with _deterministic_protos():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
      )
    )
  return builder


def _has_dataset(root: Path) -> bool:
  return any(root.glob("*/dataset_info.json"))


def build(config: CorpusConfig, output_dir: str | os.PathLike, *, update: bool = False):
  """Write the dataset under ``output_dir`` plus manifest and indexes; returns (builder, report).

  A full build (``update=False``) regenerates the dataset from the inputs. Parsing comes first
  and resumes from the units an interrupted build finished (``OUTPUT/.astro_corpus-work``).
  TFDS deletes an existing dataset before it writes, so the previous one is moved aside
  first, put back if the build fails (a full disk: ``diskspace.DiskFullError`` naming
  ``output_dir``) and removed once the new one is in place. A build killed meanwhile leaves it
  aside, and the next build puts it back before starting.

  ``update=True`` grows the newest version in ``output_dir`` with the units it does not hold
  yet, as a new version (see the module docstring); the previous versions stay.
  """
  out = Path(output_dir)
  root = out / AstroCorpus.name
  aside = out / f".{AstroCorpus.name}.previous"
  work = out / WORK_DIR
  if aside.exists() and not _has_dataset(root):
    shutil.rmtree(root, ignore_errors=True)
    aside.rename(root)
  shutil.rmtree(aside, ignore_errors=True)
  try:
    with diskspace.disk_full_errors(
      os.fspath(output_dir), "the dataset under", "the previous dataset there, if any, is unchanged"
    ):
      if update:
        builder, report = _update(config, out, work)
      else:
        plan = make_plan(config, work)
        if plan.is_empty():
          raise ValueError(
            f"no record to write: {plan.report.papers_seen} entries seen, "
            f"{plan.report.papers_kept} kept ({_skip_summary(plan.report)})"
          )
        if root.exists():
          root.rename(aside)
        try:
          builder, report = _write_tfds(plan, out), plan.report
        except BaseException:
          shutil.rmtree(root, ignore_errors=True)
          if aside.exists():
            aside.rename(root)
          raise
  except diskspace.DiskFullError:
    shutil.rmtree(work, ignore_errors=True)  # make room; the next build parses again
    raise
  shutil.rmtree(aside, ignore_errors=True)
  shutil.rmtree(work, ignore_errors=True)
  return builder, report


# ----------------------------------------------------------------------------- manifest


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
  skipped, papers = _manifest_entries(plan)
  with open(ds_dir / MANIFEST, "w", encoding="utf-8") as f:
    f.write(json.dumps(head, indent=1, sort_keys=True)[:-2] + ',\n "skipped": ')
    _json_list(f, skipped)
    f.write(',\n "papers": ')
    _json_list(f, papers)
    f.write("\n}\n")
  previous = plan.stored.units if plan.stored else []
  (ds_dir / UNITS).write_text(json.dumps(previous + units, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- update


def _shard_name(split: str, i: int, n: int) -> str:
  return f"{AstroCorpus.name}-{split}.array_record-{i:05d}-of-{n:05d}"


def _shards(ds_dir: Path, info: dict, split: str) -> list[tuple[Path, int]]:
  for s in info.get("splits", []):
    if s["name"] == split:
      lengths = [int(x) for x in s["shardLengths"]]
      return [(ds_dir / _shard_name(split, i, len(lengths)), n) for i, n in enumerate(lengths)]
  return []


def _link_or_copy(src: Path, dst: Path) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def _next_version(ds_dir: Path) -> str:
  major, minor, _ = (int(x) for x in ds_dir.name.split("."))
  return f"{major}.{minor + 1}.0"


def _assemble(
  old_dir: Path, delta_dir: Path, new_dir: Path, dropped: dict[str, np.ndarray], version: str
) -> None:
  """A new version folder: the old shards (hard links; a shard that loses records is rewritten
  without them) then the delta's shards, one ``dataset_info.json`` over both, and the
  indexes merged (old record positions shift past the dropped ones, the delta's come after)."""
  from array_record.python import array_record_data_source, array_record_module

  new_dir.mkdir(parents=True)
  old_info = json.loads((old_dir / "dataset_info.json").read_text())
  delta_info = json.loads((delta_dir / "dataset_info.json").read_text())
  old_keys = record_keys(old_dir)
  delta_keys = record_keys(delta_dir)
  splits, keys = [], {}
  for split in SPLITS:
    old, delta = _shards(old_dir, old_info, split), _shards(delta_dir, delta_info, split)
    drop = {int(i) for i in dropped.get(split, ())}
    n_total = len(old) + len(delta)
    lengths, start = [], 0
    for i, (path, n) in enumerate(old + delta):
      target = new_dir / _shard_name(split, i, n_total)
      is_old = i < len(old)
      lost = [j for j in range(n) if start + j in drop] if is_old else []
      if lost:
        src = array_record_data_source.ArrayRecordDataSource([os.fspath(path)])
        writer = array_record_module.ArrayRecordWriter(os.fspath(target), "group_size:1")
        kept = [j for j in range(n) if start + j not in drop]
        for j in kept:
          writer.write(src[j])
        writer.close()
        lengths.append(len(kept))
      else:
        _link_or_copy(path, target)
        lengths.append(n)
      start += n if is_old else 0
    num_bytes = sum(
      int(s["numBytes"])
      for info in (old_info, delta_info)
      for s in info.get("splits", [])
      if s["name"] == split
    )
    num_bytes -= _bytes_of(old_dir, old_info, split, drop)
    if lengths and sum(lengths):
      splits.append(
        {
          "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
          "name": split,
          "numBytes": str(num_bytes),
          "shardLengths": [str(n) for n in lengths],
        }
      )
    parts = []
    if split in old_keys:
      keep = np.setdiff1d(np.arange(len(old_keys[split]["id"])), sorted(drop))
      parts.append({k: v[keep] for k, v in old_keys[split].items()})
    if split in delta_keys:
      parts.append(delta_keys[split])
    if parts:
      keys[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  info = dict(old_info, version=version, splits=splits)
  info["releaseNotes"] = dict(
    old_info.get("releaseNotes", {}), **{version: f"update of {old_dir.name}"}
  )
  (new_dir / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
  shutil.copyfile(old_dir / "features.json", new_dir / "features.json")
  for name in (MANIFEST, UNITS):
    shutil.copyfile(delta_dir / name, new_dir / name)
  _save_indexes(new_dir, keys)


def _bytes_of(ds_dir: Path, info: dict, split: str, drop: set[int]) -> int:
  """Serialized size of the records ``drop`` of ``split`` (TFDS counts numBytes that way)."""
  if not drop:
    return 0
  from array_record.python import array_record_data_source

  paths = [os.fspath(p) for p, _ in _shards(ds_dir, info, split)]
  src = array_record_data_source.ArrayRecordDataSource(paths)
  return sum(len(src[i]) for i in sorted(drop))


def _update(config: CorpusConfig, out: Path, work: Path):
  try:
    old_dir = dataset_dir(out)
  except FileNotFoundError:
    raise ValueError(f"--update: no dataset under {out} to update (build it first)") from None
  manifest_config = _manifest_head(old_dir).get("config", {})
  old_fraction = manifest_config.get("validation_fraction", config.validation_fraction)
  if old_fraction != config.validation_fraction:
    raise ValueError(
      f"--update: the dataset in {old_dir} splits with validation_fraction "
      f"{old_fraction}, not {config.validation_fraction}; an id must keep its split"
    )
  stored = Stored.load(old_dir)
  plan = make_plan(config, work, stored)
  if plan.is_empty():  # a replacement always brings records, so nothing is dropped either
    from absl import logging

    logging.info("nothing new for %s: it stays as it is", old_dir)
    return tfds.builder_from_directory(os.fspath(old_dir)), plan.report
  scratch = out / f".{AstroCorpus.name}-update"
  shutil.rmtree(scratch, ignore_errors=True)
  version = _next_version(old_dir)
  try:
    delta_dir = Path(_write_tfds(plan, scratch / "delta").data_dir)
    new_tmp = scratch / version
    _assemble(old_dir, delta_dir, new_tmp, plan.dropped, version)
    new_tmp.rename(old_dir.parent / version)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return tfds.builder_from_directory(os.fspath(old_dir.parent / version)), plan.report


def _manifest_head(ds_dir: Path) -> dict:
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


# ----------------------------------------------------------------------------- reading


def _version_key(ds_dir: Path) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in ds_dir.name.split("."))
  except ValueError:
    return (-1,)


def dataset_dir(data_dir: str | os.PathLike) -> Path:
  """The newest versioned folder (with dataset_info.json) under ``data_dir``, or ``data_dir``."""
  d = Path(data_dir)
  if (d / "dataset_info.json").exists():
    return d
  found = sorted(
    (
      p.parent
      for p in d.glob(f"{AstroCorpus.name}/*/dataset_info.json")
      if not p.parent.name.startswith(".")
    ),
    key=_version_key,
  )
  if not found:
    raise FileNotFoundError(
      f"no astro_corpus dataset under {d} (run astrollama_jax.commands.prepare)"
    )
  return found[-1]


def split_sizes(data_dir: str | os.PathLike) -> dict[str, int]:
  """``{split: records}`` of the corpus under ``data_dir`` (from its metadata; nothing is read)."""
  builder = tfds.builder_from_directory(os.fspath(dataset_dir(data_dir)))
  return {name: int(info.num_examples) for name, info in builder.info.splits.items()}


def read_split(data_dir: str | os.PathLike, split: str):
  """A random-access source of decoded records (dicts of bytes) for one split."""
  builder = tfds.builder_from_directory(os.fspath(dataset_dir(data_dir)))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)} under {data_dir}")
  return builder.as_data_source(split=split)


class TextSource:
  """``read_split``'s records, the ``text`` field only: ``{"text": bytes}`` per record, same order.

  The input pipeline reads nothing else, and TFDS's decoding of all seven features costs ~10x
  the ArrayRecord read itself (most of a record's cost besides tokenizing), so the protos are
  parsed here and only ``text`` is taken. Picklable (Grain workers reopen the shards).
  """

  def __init__(self, data_dir: str | os.PathLike, split: str):
    d = dataset_dir(data_dir)
    shards = _shards(d, json.loads((d / "dataset_info.json").read_text()), split)
    if not shards:
      raise ValueError(f"split {split!r} not in {sorted(split_sizes(d))} under {data_dir}")
    self._paths = [os.fspath(p) for p, _ in shards]
    self._len = sum(n for _, n in shards)
    self._reader = None

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, bytes]:
    from tensorflow_datasets.proto import tf_example_pb2

    if self._reader is None:
      from array_record.python import array_record_data_source

      self._reader = array_record_data_source.ArrayRecordDataSource(self._paths)
    example = tf_example_pb2.Example.FromString(self._reader[int(i)])
    return {"text": example.features.feature["text"].bytes_list.value[0]}

  def __getstate__(self):
    return {**self.__dict__, "_reader": None}

  def __repr__(self) -> str:
    return f"TextSource({len(self)} records)"


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def compute_record_keys(ds_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """``{split: {id, section, version, date}}`` arrays in record order (one pass)."""
  builder = tfds.builder_from_directory(os.fspath(ds_dir))
  out = {}
  for split in builder.info.splits:
    src = builder.as_data_source(split=split)
    cols: dict[str, list] = {"id": [], "section": [], "version": [], "date": []}
    for i in range(len(src)):
      rec = src[i]
      for k in ("id", "section", "date"):
        cols[k].append(_text(rec[k]))
      cols["version"].append(int(rec.get("version", 0)))
    out[split] = {
      k: np.asarray(v, np.int32 if k == "version" else np.str_) for k, v in cols.items()
    }
  return out


def written_record_keys(
  ds_dir: str | os.PathLike, written: dict[str, list[tuple]]
) -> dict[str, dict[str, np.ndarray]]:
  """``compute_record_keys`` without reading the records back: from the keys as they were
  generated, in the order TFDS writes them (ascending hash of the key, salted with the split).

  That order is TFDS's, so it is checked on a few records read back (evenly spaced, the first
  and last included); should it ever differ, the keys are read back from all records instead.
  """
  out = {}
  for split, rows in written.items():
    if not rows:
      continue
    hasher = hashing.Hasher(split)
    rows = sorted(rows, key=lambda r: hasher.hash_key(r[0]))
    cols = list(zip(*rows))
    out[split] = {
      "id": np.asarray(cols[1], np.str_),
      "section": np.asarray(cols[2], np.str_),
      "version": np.asarray(cols[3], np.int32),
      "date": np.asarray(cols[4], np.str_),
    }
  builder = tfds.builder_from_directory(os.fspath(ds_dir))
  for split in builder.info.splits:
    src, keys = builder.as_data_source(split=split), out.get(split)
    if keys is None or len(keys["id"]) != len(src):
      break
    probe = [int(i) for i in np.unique(np.linspace(0, len(src) - 1, 17).astype(np.int64))]
    read = [src[i] for i in probe]
    if [(_text(r["id"]), _text(r["section"])) for r in read] != [
      (keys["id"][i], keys["section"][i]) for i in probe
    ]:
      break
  else:
    if set(out) == set(builder.info.splits):
      return out
  from absl import logging

  logging.warning("records are not in the order they were keyed; reading the keys back")
  return compute_record_keys(ds_dir)


def _section_arrays(keys: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  out = {}
  for split, k in keys.items():
    sections = k["section"].astype(str)
    for name in sorted(set(sections.tolist())):
      out[f"{split}/{name}"] = np.flatnonzero(sections == name).astype(np.int64)
  return dict(sorted(out.items()))


def compute_section_index(ds_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Record indices per ``{split}/{section}`` (one pass over the records)."""
  return _section_arrays(compute_record_keys(ds_dir))


def _save_indexes(ds_dir: Path, keys: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  arrays = _section_arrays(keys)
  with open(ds_dir / SECTION_INDEX, "wb") as f:
    np.savez(f, **arrays)
  with open(ds_dir / RECORD_KEYS, "wb") as f:
    np.savez(f, **{f"{s}/{k}": v for s, cols in sorted(keys.items()) for k, v in cols.items()})
  return arrays


def write_section_index(ds_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Save the section index and the record keys next to the data, so readers skip the pass."""
  return _save_indexes(Path(ds_dir), compute_record_keys(ds_dir))


def section_index(data_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
  """``{section: record indices}`` for a split (from the saved index, or computed)."""
  d = dataset_dir(data_dir)
  path = d / SECTION_INDEX
  arrays = dict(np.load(path)) if path.exists() else compute_section_index(d)
  prefix = f"{split}/"
  return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def record_keys(data_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """``{split: {id, section, version, date}}`` of every record (saved, or computed)."""
  d = dataset_dir(data_dir)
  path = d / RECORD_KEYS
  if not path.exists():
    return compute_record_keys(d)
  out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  with np.load(path) as z:
    for name in z.files:
      split, key = name.split("/", 1)
      out[split][key] = z[name]
  return dict(out)


def select_records(
  data_dir: str | os.PathLike,
  split: str,
  *,
  since: str = "",
  until: str = "",
  sections: Sequence[str] | None = None,
) -> np.ndarray:
  """Indices of the records of ``split`` dated within [since, until] (see ``in_dates``) and of
  ``sections`` (all if None): e.g. "everything since 2024-06" as one mixture component."""
  check_date(since, "since")
  check_date(until, "until")
  keys = record_keys(data_dir).get(split)
  if keys is None:
    return np.zeros(0, np.int64)
  dates = keys["date"].astype(str)
  ok = np.ones(len(dates), bool)
  if since:
    ok &= dates >= since
  if until:
    ok &= np.asarray([d[: len(until)] <= until if d else False for d in dates.tolist()], bool)
  if since or until:
    ok &= dates != ""
  if sections is not None:
    ok &= np.isin(keys["section"].astype(str), list(sections))
  return np.flatnonzero(ok).astype(np.int64)


def component_indices(data_dir: str | os.PathLike, split: str, spec: str) -> np.ndarray:
  """Record indices a mixture component names: space separated terms, each a section name,
  ``since:DATE`` or ``until:DATE`` (e.g. ``"since:2024-06"``, ``"introduction until:2019"``)."""
  sections, bounds = [], {"since": "", "until": ""}
  for term in spec.split():
    key, _, value = term.partition(":")
    if key in bounds and value:
      bounds[key] = value
    elif term in SECTIONS:
      sections.append(term)
    else:
      raise ValueError(
        f"mixture component {spec!r}: {term!r} is neither a section {SECTIONS} "
        "nor since:DATE / until:DATE"
      )
  return select_records(
    data_dir, split, since=bounds["since"], until=bounds["until"], sections=sections or None
  )
