"""``python -m astrollama_jax feedback``: the expert ratings as training data, and their counts.

    python -m astrollama_jax feedback export --db=ratings.sqlite --output=feedback_sft.jsonl \\
        [--pairs=feedback_pairs.jsonl] [--min_rating=4] [--since=2024-05-01]
    python -m astrollama_jax feedback stats --db=ratings.sqlite [--since=DATE]

``export`` writes the corrected (and the highly rated) conversations as ShareGPT JSONL, a source
for ``config.data.sft.sources`` of the SFT config, and the (chosen, rejected) pairs as JSONL.
``stats`` prints the ratings per tag and per checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from astrollama_jax.commands import cli
from astrollama_jax.errors import UserError
from astrollama_jax.util import checks, tables

ACTIONS = ("export", "stats")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when run, never on import)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_string(
    "db", None, "The SQLite ratings file the server wrote (--feedback_db); only read.", **fv
  )
  cli.define(
    "output",
    help={"output": "export: the ShareGPT JSONL of the conversations."},
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "pairs",
    None,
    "export: the preference pairs JSONL (default: beside --output, named *.pairs.jsonl).",
    **fv,
  )
  flags.DEFINE_integer(
    "min_rating",
    4,
    "export: uncorrected answers rated at least this are kept "
    "as SFT data (corrected ones always are).",
    **fv,
  )
  flags.DEFINE_string(
    "since", None, "Only ratings made at or after this ISO date or date-time (UTC).", **fv
  )
  flags.mark_flag_as_required("db", flag_values=flag_values)


def pairs_path(output: str) -> str:
  stem = output.removesuffix(".jsonl")
  return f"{stem}.pairs.jsonl"


def main(argv: Sequence[str], F: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f"give one action: {' or '.join(ACTIONS)}")
  from astrollama_jax.feedback import datasets
  from astrollama_jax.feedback.store import open_existing

  since = datasets.parse_since(F.since)  # a bad date fails before the file is opened
  if argv[1] == "export":
    if not F.output:
      raise UserError("export needs --output=FILE")
    pairs = F.pairs or pairs_path(F.output)
    outputs = {"--output": F.output, "--pairs": pairs}
    datasets.check_outputs(F.db, outputs)  # before the file is opened: never onto the database
    for flag, path in outputs.items():
      checks.check_output_file(path, flag)
  store = open_existing(F.db)
  try:
    if argv[1] == "export":
      tables.report("feedback export", datasets.export(store, F.output, pairs, F.min_rating, since))
      return
    rows = store.rows(since=since)
    tags, ckpts = datasets.stats(rows)
    print("ratings per tag")
    print(tables.format_table(tags))
    print()
    tables.report(
      "ratings per checkpoint",
      {
        "db": F.db,
        "ratings": len(rows),
        "since": since,
        "per_tag": {r["tag"]: r for r in tags},
        "per_checkpoint": {r["checkpoint"]: r for r in ckpts},
      },
      ckpts,
    )
  finally:
    store.close()
