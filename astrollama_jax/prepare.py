r"""Build the astro corpus (TFDS, ArrayRecord) from arXiv sources.

  python -m astrollama_jax.prepare --source=data/demo_corpus --output=/tmp/astro_corpus \
      --validation_fraction=0.15 --workers=2

``--source`` is repeatable or comma separated: LaTeX bundles (.gz, .tar.gz, .tgz, .tar,
.tex), paper folders, folders of those, and JSON lines files (arXiv metadata snapshot
or the project's abstracts format). The dataset lands in
``OUTPUT/astro_corpus/1.0.0/`` with ``manifest.json`` (retention report, every skipped
document with its reason, every kept section's source span). Reruns on the same inputs
write the same records.
"""

from __future__ import annotations

from absl import app, flags, logging

from astrollama_jax import diskspace
from astrollama_jax.data import corpus

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("source", None, "Input path(s); repeat the flag or separate with commas.")
flags.DEFINE_string("output", None, "Output data_dir for the TFDS dataset.")
flags.DEFINE_list("categories", ["astro-ph*"], "fnmatch patterns; a record matching any is kept.")
flags.DEFINE_float("validation_fraction", 0.05, "Fraction of arXiv ids (by hash) in validation.")
flags.DEFINE_integer("workers", 0, "Processes for LaTeX parsing (0: in this process).")
flags.DEFINE_float("timeout_s", 30.0, "Wall-time limit per LaTeX document, seconds.")
flags.DEFINE_integer("max_mb", 8, "Skip a paper whose TeX files exceed this many MiB.")
flags.mark_flags_as_required(["source", "output"])


def parse_sources(values: list[str]) -> list[str]:
  out = [v.strip() for value in values for v in value.split(",") if v.strip()]
  if not out:
    raise app.UsageError("--source names no path")
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not 0.0 <= FLAGS.validation_fraction < 1.0:
    raise app.UsageError("--validation_fraction must be in [0, 1)")
  config = corpus.CorpusConfig(
    sources=parse_sources(FLAGS.source),
    categories=tuple(FLAGS.categories),
    validation_fraction=FLAGS.validation_fraction,
    workers=FLAGS.workers,
    timeout_s=FLAGS.timeout_s,
    max_bytes=FLAGS.max_mb << 20,
  )
  try:
    builder, report = corpus.build(config, FLAGS.output)
  except ValueError as e:  # bad input: say what, and stop before writing anything
    raise app.UsageError(str(e)) from None
  except diskspace.DiskFullError as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None
  logging.info("dataset written to %s", builder.data_dir)
  print("\n" + report.table())
  print(f"\ndataset: {builder.data_dir}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
