"""The metadata join: per arXiv id, its winning metadata record, and the filters it decides.

Metadata files are read in one streaming pass (each by its format's reader, see
``source_formats``); an id keeps its winning record's fields but not its abstract, which is
read again when the records are written. The filters: categories, licences, dates.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
import dataclasses
import fnmatch
from pathlib import Path
import re

from astrollama_jax.data.corpus.config import CorpusConfig, Report
from astrollama_jax.data.corpus.source_formats import metadata_reader

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


def date_from_id(arxiv_id: str) -> str:
  """The month an arXiv id names (``2101.00001`` -> 2021-01-01, ``astro-ph/9901001`` ->
  1999-01-01), or "" for an id of another shape."""
  m = _NEW_ID_RE.match(arxiv_id) or _OLD_ID_RE.match(arxiv_id)
  if not m or not 1 <= int(m.group(2)) <= 12:
    return ""
  yy = int(m.group(1))
  year = 2000 + yy if m.re is _NEW_ID_RE or yy < 91 else 1900 + yy
  return f"{year:04d}-{m.group(2)}-01"


def in_dates(date: str, since: str, until: str) -> bool:
  """Inclusive bounds on a YYYY-MM-DD date; a bound may be YYYY or YYYY-MM (whole periods)."""
  if not since and not until:
    return True
  if not date:
    return False
  return (not since or date >= since) and (not until or date[: len(until)] <= until)


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
  """Metadata per id from the metadata files, filtered by the config, in one streaming pass.

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
    self._readers = [metadata_reader(p) for p in self.files]
    for fi, (path, read) in enumerate(zip(self.files, self._readers)):
      for lineno, rec in read(path, skipped):
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
    lines: dict[int, set[int]] = collections.defaultdict(set)
    for fi, lineno in want:
      lines[fi].add(lineno)
    for fi, (path, read) in enumerate(zip(self.files, self._readers)):
      if lines[fi]:
        for lineno, rec in read(path, None, lines[fi]):
          yield want[(fi, lineno)], rec["abstract"]
