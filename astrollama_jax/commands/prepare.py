r"""Build the astro corpus (TFDS, ArrayRecord) from arXiv sources.

  python -m astrollama_jax prepare --source=arxiv_src/ \
      --source=arxiv-metadata-oai-snapshot.json --output=corpus/ --workers=16
  python -m astrollama_jax prepare --source=data/demo_corpus --output=/tmp/astro_corpus \
      --validation_fraction=0.15

``--source`` is repeatable or comma separated: arXiv bulk source tars
(``arXiv_src_YYMM_NNN.tar``), folders of them or their extracted ``YYMM/`` folders, LaTeX
bundles (.gz, .tar.gz, .tgz, .tar, .tex, .pdf), paper folders, and JSON lines files (the arXiv
metadata snapshot or the project's abstracts format). The dataset lands in
``OUTPUT/astro_corpus/1.0.0/`` with ``manifest.json`` (retention report, every skipped entry
with its id and reason, every kept section's source span). Reruns on the same inputs write
the same records; a build that was killed resumes from the bulk tars it had finished.
``--update`` grows the dataset with the sources it does not hold yet (next month's tars) as a
new version, ``OUTPUT/astro_corpus/1.1.0/``, without reading the old tars again.
"""

from __future__ import annotations

from absl import flags, logging

from astrollama_jax.commands import cli
from astrollama_jax.data.corpus.build import build
from astrollama_jax.data.corpus.config import REFERENCE_RETENTION, CorpusConfig, Report
from astrollama_jax.data.corpus.read import check_date
from astrollama_jax.errors import UserError
from astrollama_jax.util import tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags exist only when run as a command, so importing this module defines none."""
  flags.DEFINE_multi_string(
    "source", None, "Input path(s); repeat the flag or separate with commas."
  )
  cli.define("output", help={"output": "Folder (TFDS data_dir) the dataset is written under."})
  flags.DEFINE_list("categories", ["astro-ph*"], "fnmatch patterns; a record matching any is kept.")
  flags.DEFINE_list(
    "licenses",
    [],
    "fnmatch patterns on the metadata's licence URL, or "
    "'redistributable' (CC BY, CC BY-SA, CC0); default: any licence.",
  )
  flags.DEFINE_string(
    "since", "", "Keep papers first submitted on/after this date (YYYY[-MM[-DD]])."
  )
  flags.DEFINE_string("until", "", "Keep papers first submitted on/before this date.")
  flags.DEFINE_float("validation_fraction", 0.05, "Fraction of arXiv ids (by hash) in validation.")
  flags.DEFINE_integer("workers", 0, "Processes for LaTeX parsing (0: in this process).")
  flags.DEFINE_float("timeout_s", 30.0, "Wall-time limit per LaTeX document, seconds.")
  flags.DEFINE_integer(
    "max_mb",
    8,
    "Skip a paper whose TeX text exceeds this many MiB (figures and other files do not count).",
  )
  flags.DEFINE_bool(
    "update",
    False,
    "Grow the dataset in --output with the sources it does not hold yet, as a new version.",
  )


def parse_sources(values: list[str] | None) -> list[str]:
  out = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
  if not out:
    raise UserError("--source names no path")
  return out


def config_from_flags() -> CorpusConfig:
  if not FLAGS.output:
    raise UserError("--output is required")
  if not 0.0 <= FLAGS.validation_fraction < 1.0:
    raise UserError("--validation_fraction must be in [0, 1)")
  if FLAGS.max_mb <= 0 or FLAGS.workers < 0:
    raise UserError("--max_mb must be positive and --workers not negative")
  return CorpusConfig(
    sources=parse_sources(FLAGS.source),
    categories=tuple(FLAGS.categories),
    validation_fraction=FLAGS.validation_fraction,
    workers=FLAGS.workers,
    timeout_s=FLAGS.timeout_s,
    max_bytes=FLAGS.max_mb << 20,
    licenses=tuple(FLAGS.licenses),
    since=check_date(FLAGS.since, "--since"),
    until=check_date(FLAGS.until, "--until"),
  )


def summary(report: Report, data_dir: str) -> dict:
  """The closing JSON line: where the dataset is and how much of the input it kept."""
  return {
    "dataset": data_dir,
    "papers_seen": report.papers_seen,
    "papers_kept": report.papers_kept,
    "retention": round(report.retention, 4),
    "reference_retention": REFERENCE_RETENTION,
    "skipped": report.papers_skipped,
    "jsonl_abstracts_kept": report.jsonl_records_kept,
    "jsonl_skipped": report.jsonl_skipped,
    "records": report.records,
    "sources": report.units_seen,
    "sources_resumed": report.units_resumed,
    "sources_already_in_corpus": report.units_already_in_corpus,
    "papers_replaced": report.papers_replaced,
  }


def main(argv: list[str]) -> None:
  cli.no_extra_args(argv)
  config = config_from_flags()
  builder, report = build(config, FLAGS.output, update=FLAGS.update)
  logging.info("dataset written to %s", builder.data_dir)
  rows = report.rows() + [("dataset", str(builder.data_dir))]
  tables.report(
    "prepare: retention", summary(report, str(builder.data_dir)), rows=rows, columns=("", "count")
  )
