"""The astro corpus: arXiv inputs -> section records -> a TFDS ArrayRecord dataset.

``collect`` turns source paths (LaTeX bundles, folders of them, metadata/abstract JSON
lines) into records ``{id, title, date, section, text}``, in parallel over papers, and a
``Report`` of what was kept and what was skipped and why. ``AstroCorpus`` is a
``tfds.core.GeneratorBasedBuilder`` that writes those records as ArrayRecord (TFDS works
without TensorFlow for this path). ``build`` runs both and writes ``manifest.json`` (the
report, every skipped document with its reason, every kept section's raw span) and
``section_index.npz`` (record indices per split and section, so the Grain pipeline can
mix sections without a pass over the data).

Decisions, so that the same inputs always give the same bytes:
* one record per (arXiv id, section). Ids lose their ``vN`` suffix; among several
  versions of a paper the highest wins; among several JSONL records of an id the latest
  ``date`` wins, then the first in source order. When both a JSONL abstract and a LaTeX
  abstract exist, the JSONL one (arXiv's own text) is kept.
* the split is a function of the id alone: sha256(id) as a fraction below
  ``validation_fraction`` means validation. All sections of a paper share a split.
* categories: a record is kept if any of its categories matches any pattern (fnmatch,
  default ``astro-ph*``). LaTeX papers without metadata are kept (they were given as
  astro sources on purpose) and counted as ``no_metadata``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tqdm import tqdm

from astrollama_jax import diskspace
from astrollama_jax.data import latex, sources

SPLITS = ("train", "validation")
SECTIONS = latex.SECTION_NAMES
MANIFEST = "manifest.json"
SECTION_INDEX = "section_index.npz"


@dataclasses.dataclass
class CorpusConfig:
  """What to build from: see the module docstring for the rules."""

  sources: Sequence[str]
  categories: Sequence[str] = ("astro-ph*",)
  validation_fraction: float = 0.05
  workers: int = 0  # processes for LaTeX parsing; 0 = in this process
  timeout_s: float = latex.DEFAULT_TIMEOUT_S
  max_bytes: int = sources.DEFAULT_MAX_BYTES
  progress: bool = True


@dataclasses.dataclass
class Report:
  """Retention: what was seen, kept and skipped (by reason)."""

  papers_seen: int = 0
  papers_kept: int = 0
  papers_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  sections_found: dict[str, int] = dataclasses.field(default_factory=dict)
  jsonl_records_seen: int = 0
  jsonl_records_kept: int = 0
  jsonl_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  papers_without_metadata: int = 0  # kept: no JSONL record names their id
  latex_abstracts_replaced: int = 0  # a JSONL abstract of the same id was kept instead
  records: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split->section->n

  @property
  def retention(self) -> float:
    return self.papers_kept / self.papers_seen if self.papers_seen else 0.0

  def table(self) -> str:
    """A human-readable summary (printed at the end of ``prepare``)."""
    lines = [
      f"{'LaTeX papers seen':32s} {self.papers_seen:>9d}",
      f"{'LaTeX papers kept':32s} {self.papers_kept:>9d}  ({self.retention:.1%})",
    ]
    for name in SECTIONS:
      lines.append(f"{'  with ' + name:32s} {self.sections_found.get(name, 0):>9d}")
    for reason, n in sorted(self.papers_skipped.items()):
      lines.append(f"{'  skipped: ' + reason:32s} {n:>9d}")
    lines.append(f"{'  kept without metadata':32s} {self.papers_without_metadata:>9d}")
    lines.append(f"{'JSONL records seen':32s} {self.jsonl_records_seen:>9d}")
    lines.append(f"{'JSONL abstracts kept':32s} {self.jsonl_records_kept:>9d}")
    for reason, n in sorted(self.jsonl_skipped.items()):
      lines.append(f"{'  skipped: ' + reason:32s} {n:>9d}")
    for split in SPLITS:
      per = self.records.get(split, {})
      detail = ", ".join(f"{k} {v}" for k, v in sorted(per.items()))
      lines.append(f"{'records ' + split:32s} {sum(per.values()):>9d}  ({detail})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- discovery


def discover(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
  """Split source paths into (JSONL files, LaTeX bundles); raises on missing/empty input.

  A folder holding ``.tex`` files (and no archives or JSONL) is one paper; any other
  folder is searched (sorted) for ``.jsonl`` files, bundle files and paper folders.
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
        if child.is_dir() or child.name.endswith((".jsonl",) + sources.BUNDLE_SUFFIXES):
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
        ".tgz, .tar, .tex) nor a folder"
      )

  for raw in paths:
    p = Path(raw)
    if not p.exists():
      raise ValueError(f"source does not exist: {p}")
    visit(p, True)
  return jsonl, bundles


def category_ok(categories: Sequence[str], patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(c, pat) for c in categories for pat in patterns)


def split_of(arxiv_id: str, validation_fraction: float) -> str:
  """Deterministic split from the id: the first 8 bytes of sha256 as a fraction of 2**64."""
  h = int.from_bytes(hashlib.sha256(arxiv_id.encode("utf-8")).digest()[:8], "big")
  return "validation" if h / 2.0**64 < validation_fraction else "train"


# ----------------------------------------------------------------------------- collection


def _process(args: tuple[str, float, int]) -> latex.Paper | latex.Skipped:
  path, timeout_s, max_bytes = args
  return latex.process_paper(path, timeout_s=timeout_s, max_bytes=max_bytes)


def _parse_all(bundles: list[Path], config: CorpusConfig) -> list[latex.Paper | latex.Skipped]:
  work = [(str(p), config.timeout_s, config.max_bytes) for p in bundles]
  bar = dict(total=len(work), desc="papers", unit="paper", disable=not config.progress)
  if config.workers > 0 and len(work) > 1:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with ctx.Pool(config.workers) as pool:
      return list(tqdm(pool.imap(_process, work, chunksize=4), **bar))  # imap keeps order
  return [_process(w) for w in tqdm(work, **bar)]


@dataclasses.dataclass
class Collected:
  records: dict[str, list[dict]]  # split -> records sorted by (id, section)
  report: Report
  skipped: list[dict]  # every skipped paper: id, source, reason, detail
  papers: list[dict]  # every kept paper: id, source, main file, section spans


def collect(config: CorpusConfig) -> Collected:
  """Read every source and return the deduplicated, split records plus the report."""
  jsonl_files, bundles = discover(config.sources)
  report = Report()
  jsonl_skip: collections.Counter = collections.Counter()

  # JSONL: metadata for papers, and abstract records of their own.
  meta: dict[str, dict] = {}
  for path in jsonl_files:
    for rec in sources.read_jsonl(path):
      report.jsonl_records_seen += 1
      old = meta.get(rec["id"])
      if old is not None:
        jsonl_skip["duplicate_id"] += 1
        if rec["date"] <= old["date"]:
          continue
      meta[rec["id"]] = rec

  # LaTeX: parse in parallel, then keep one version per id.
  results = _parse_all(bundles, config)
  report.papers_seen = len(results)
  skip_count: collections.Counter = collections.Counter()
  skipped: list[dict] = []
  best: dict[str, latex.Paper] = {}
  for r in results:
    if isinstance(r, latex.Skipped):
      skip_count[r.reason] += 1
      skipped.append(dataclasses.asdict(r))
      continue
    m = meta.get(r.id)
    if m is not None and m["categories"] and not category_ok(m["categories"], config.categories):
      skip_count["category"] += 1
      skipped.append(
        {"id": r.id, "source": r.source, "reason": "category", "detail": " ".join(m["categories"])}
      )
      continue
    if m is None:
      report.papers_without_metadata += 1
    old = best.get(r.id)
    if old is not None:
      loser = r if r.version <= old.version else old
      skip_count["older_version"] += 1
      skipped.append(
        {
          "id": loser.id,
          "source": loser.source,
          "reason": "older_version",
          "detail": f"v{loser.version}",
        }
      )
      if r.version <= old.version:
        continue
    best[r.id] = r
  report.papers_kept = len(best)
  report.papers_skipped = dict(skip_count)
  report.sections_found = dict(collections.Counter(n for p in best.values() for n in p.sections))

  records: dict[str, dict] = {}
  for pid, p in best.items():
    m = meta.get(pid, {})
    for name, sec in p.sections.items():
      records[(pid, name)] = {
        "id": pid,
        "title": m.get("title") or p.title,
        "date": m.get("date", ""),
        "section": name,
        "text": sec.text,
      }
  for pid, m in meta.items():
    if m["categories"] and not category_ok(m["categories"], config.categories):
      jsonl_skip["category"] += 1
      continue
    if not m["categories"] and pid not in best:
      jsonl_skip["no_categories"] += 1
      continue
    if not m["abstract"]:
      jsonl_skip["no_abstract"] += 1
      continue
    if (pid, "abstract") in records:
      report.latex_abstracts_replaced += 1
    records[(pid, "abstract")] = {
      "id": pid,
      "title": m["title"],
      "date": m["date"],
      "section": "abstract",
      "text": m["abstract"],
    }
    report.jsonl_records_kept += 1
  report.jsonl_skipped = {k: v for k, v in jsonl_skip.items() if v}
  report.papers_skipped = {k: v for k, v in report.papers_skipped.items() if v}

  by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
  for key in sorted(records):
    rec = records[key]
    by_split[split_of(rec["id"], config.validation_fraction)].append(rec)
  report.records = {
    s: dict(collections.Counter(r["section"] for r in recs)) for s, recs in by_split.items()
  }
  papers = [
    {
      "id": p.id,
      "source": p.source,
      "main_file": p.main_file,
      "missing_inputs": p.missing_inputs,
      "sections": {
        n: {"title": s.title, "spans": [dataclasses.asdict(x) for x in s.spans]}
        for n, s in p.sections.items()
      },
    }
    for _, p in sorted(best.items())
  ]
  return Collected(by_split, report, skipped, papers)


# ----------------------------------------------------------------------------- TFDS builder


class AstroCorpus(tfds.core.GeneratorBasedBuilder):
  """Sections of astro-ph papers: one record per (arXiv id, section).

  Built from local files only (``config.sources``); there is nothing to download.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "abstract / introduction / conclusion records."}
  # Local files only: no checksums or package metadata to find next to the code. Setting
  # this also stops TFDS from probing the package path, which needs the optional
  # `importlib_resources` module under an editable install.
  code_path = None

  def __init__(self, *, corpus_config: CorpusConfig | None = None, **kwargs):
    self._corpus_config = corpus_config
    self.collected: Collected | None = None
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
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    if self._corpus_config is None:
      raise ValueError("AstroCorpus needs corpus_config=CorpusConfig(sources=[...]) to build")
    self.collected = collect(self._corpus_config)
    return {
      split: self._generate_examples(recs) for split, recs in self.collected.records.items() if recs
    }

  def _generate_examples(self, records):
    for rec in records:
      yield f"{rec['id']}/{rec['section']}", rec

  def _download_and_prepare(self, dl_manager, download_config):
    """The records, then ``manifest.json`` and the section index beside them, all in TFDS's
    temporary folder (``self.data_dir`` here), so that the dataset appears complete in one rename
    or not at all: a truncated index or manifest never sits beside finished records."""
    super()._download_and_prepare(dl_manager, download_config)
    self.info.write_to_directory(self.data_dir)  # so the records can be read back for the index
    _write_manifest(Path(self.data_dir), self._corpus_config, self.collected)
    write_section_index(self.data_dir)


@contextlib.contextmanager
def _deterministic_protos():
  """Serialize tf.train.Example with sorted map keys while the dataset is written.

  TFDS calls ``SerializeToString()``; the protobuf runtime then writes the feature map in
  hash-table order, which changes from process to process, so two runs on the same input
  would write different bytes. ``deterministic=True`` sorts the keys.
  """
  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


def build(config: CorpusConfig, output_dir: str | os.PathLike) -> tuple[AstroCorpus, Report]:
  """Write the dataset under ``output_dir`` (always regenerated) plus manifest and index.

  A rerun rebuilds from the inputs. TFDS writes into a temporary folder and renames it at the
  end, but it deletes an existing dataset before it starts; so the previous dataset is moved
  aside first, put back if the build fails (a full disk: ``diskspace.DiskFullError`` naming
  ``output_dir``) and removed once the new one is in place. A build killed meanwhile leaves it
  aside, and the next build puts it back before starting.
  """
  final = Path(output_dir) / AstroCorpus.name / str(AstroCorpus.VERSION)
  aside = Path(output_dir) / f".{AstroCorpus.name}-{AstroCorpus.VERSION}.previous"
  if aside.exists() and not final.exists():
    aside.rename(final)
  shutil.rmtree(aside, ignore_errors=True)
  if final.exists():
    final.rename(aside)
  try:
    with diskspace.disk_full_errors(
      os.fspath(output_dir), "the dataset under", "the previous dataset there, if any, is unchanged"
    ):
      builder = AstroCorpus(corpus_config=config, data_dir=os.fspath(output_dir))
      with _deterministic_protos():
        builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
          )
        )
  except BaseException:
    if aside.exists() and not final.exists():
      aside.rename(final)
    raise
  shutil.rmtree(aside, ignore_errors=True)
  assert builder.collected is not None
  return builder, builder.collected.report


def _write_manifest(ds_dir: Path, config: CorpusConfig, collected: Collected) -> None:
  manifest = {
    "config": {
      k: (list(v) if isinstance(v, (list, tuple)) else v)
      for k, v in dataclasses.asdict(config).items()
      if k != "progress"
    },
    "report": dataclasses.asdict(collected.report) | {"retention": collected.report.retention},
    "skipped": collected.skipped,
    "papers": collected.papers,
  }
  (ds_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def dataset_dir(data_dir: str | os.PathLike) -> Path:
  """The versioned folder (with dataset_info.json) under ``data_dir``, or ``data_dir`` itself."""
  d = Path(data_dir)
  if (d / "dataset_info.json").exists():
    return d
  found = sorted(d.glob("astro_corpus/*/dataset_info.json"))
  if not found:
    raise FileNotFoundError(f"no astro_corpus dataset under {d} (run astrollama_jax.prepare)")
  return found[-1].parent


def read_split(data_dir: str | os.PathLike, split: str):
  """A random-access source of decoded records (dicts of bytes) for one split."""
  builder = tfds.builder_from_directory(os.fspath(dataset_dir(data_dir)))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)} under {data_dir}")
  return builder.as_data_source(split=split)


def compute_section_index(ds_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Record indices per ``{split}/{section}`` (one pass over the records)."""
  builder = tfds.builder_from_directory(os.fspath(ds_dir))
  index: dict[str, list[int]] = collections.defaultdict(list)
  for split in builder.info.splits:
    src = builder.as_data_source(split=split)
    for i in range(len(src)):
      section = src[i]["section"]
      section = section.decode() if isinstance(section, bytes) else section
      index[f"{split}/{section}"].append(i)
  return {k: np.asarray(v, np.int64) for k, v in sorted(index.items())}


def write_section_index(ds_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Save ``compute_section_index`` next to the data, so readers skip the pass."""
  arrays = compute_section_index(ds_dir)
  with open(Path(ds_dir) / SECTION_INDEX, "wb") as f:
    np.savez(f, **arrays)
  return arrays


def section_index(data_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
  """``{section: record indices}`` for a split (from the saved index, or computed)."""
  d = dataset_dir(data_dir)
  path = d / SECTION_INDEX
  arrays = dict(np.load(path)) if path.exists() else compute_section_index(d)
  prefix = f"{split}/"
  return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
