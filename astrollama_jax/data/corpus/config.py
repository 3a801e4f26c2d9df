"""What a corpus build is asked to do (``CorpusConfig``) and what it reports (``Report``)."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from astrollama_jax.data import latex, sources
from astrollama_jax.data.corpus.read import SECTIONS, SPLITS

REFERENCE_RETENTION = 0.90  # share of papers the AstroLLaMA recipe keeps from astro-ph


@dataclasses.dataclass
class CorpusConfig:
  """What to build from: see the package docstring (data/corpus) for the rules."""

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
