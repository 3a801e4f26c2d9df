"""``build``: the corpus from its inputs, in full or as an update; ``prepare`` calls it.

The steps are the package docstring's (``data/corpus``): ``plan.make_plan`` (parse, plan),
``tfds_builder.write_tfds`` (write), ``update.update`` (a new version). What is here is what
keeps the output folder whole: the previous dataset moved aside and put back if a build fails.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil

import tensorflow_datasets as tfds

from astrollama_jax.data.corpus.config import CorpusConfig, Report
from astrollama_jax.data.corpus.plan import make_plan
from astrollama_jax.data.corpus.read import DATASET_NAME
from astrollama_jax.data.corpus.tfds_builder import write_tfds
from astrollama_jax.data.corpus.update import update as update_version
from astrollama_jax.util import diskspace

WORK_DIR = ".astro_corpus-work"  # under the output folder: the parse results, until the end


def _skip_summary(report: Report) -> str:
  reasons = sorted(report.papers_skipped.items()) + [
    (f"metadata {k}", v) for k, v in sorted(report.jsonl_skipped.items())
  ]
  return "skipped: " + (", ".join(f"{k} {v}" for k, v in reasons) or "nothing")


def _has_dataset(root: Path) -> bool:
  return any(root.glob("*/dataset_info.json"))


def build(
  config: CorpusConfig, output_dir: str | os.PathLike, *, update: bool = False
) -> tuple[tfds.core.DatasetBuilder, Report]:
  """Write the dataset under ``output_dir`` plus manifest and indexes; returns (builder, report).

  A full build (``update=False``) regenerates the dataset from the inputs. Parsing comes first
  and resumes from the units an interrupted build finished (``OUTPUT/.astro_corpus-work``).
  TFDS deletes an existing dataset before it writes, so the previous one is moved aside
  first, put back if the build fails (a full disk: ``diskspace.DiskFullError`` naming
  ``output_dir``) and removed once the new one is in place. A build killed meanwhile leaves it
  aside, and the next build puts it back before starting.

  ``update=True`` grows the newest version in ``output_dir`` with the units it does not hold
  yet, as a new version (see the package docstring); the previous versions stay.
  """
  out = Path(output_dir)
  root = out / DATASET_NAME
  aside = out / f".{DATASET_NAME}.previous"
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
        builder, report = update_version(config, out, work)
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
          builder, report = write_tfds(plan, out), plan.report
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
