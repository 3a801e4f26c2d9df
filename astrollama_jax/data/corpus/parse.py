"""Step 1 of a build: every unit parsed into one result file, resumably.

A unit's result file (gzipped lines, one per entry: ``header TAB texts``) is named by a hash
of the unit's fingerprint and the parse settings, written beside and renamed into place once
complete: a killed build keeps the units it finished, and a unit's result depends on its
bytes only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import gzip
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

from tqdm import tqdm

from astrollama_jax.data import latex
from astrollama_jax.data.corpus.config import CorpusConfig, Report
from astrollama_jax.data.corpus.source_formats import Unit

RESULT_FORMAT = 3  # part of every unit's result key: bump when results change shape


def _unit_key(unit: Unit, config: CorpusConfig) -> str:
  blob = json.dumps(
    [RESULT_FORMAT, unit.bulk, unit.fingerprint(), config.max_bytes, config.timeout_s]
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _result_line(r: dict) -> str:
  """One entry's result as ``header TAB texts``: the header (id, version, source, reason or
  section titles and spans) is all most passes decode; the texts only the records' pass."""
  texts = {n: s.pop("text") for n, s in r.get("sections", {}).items()}
  return json.dumps(r, sort_keys=True) + "\t" + json.dumps(texts, sort_keys=True) + "\n"


def read_results(path: Path) -> Iterator[tuple[dict, str]]:
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
        entries, error = unit.entries()
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
