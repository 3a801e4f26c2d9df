r"""``python -m astrollama_jax make_qa``: question-answer dialogues about abstracts, for SFT.

    python -m astrollama_jax make_qa --abstracts=abstracts.jsonl --output=qa.jsonl \
        --endpoint=http://localhost:8000 --model=NAME [--api_key_env=OPENAI_API_KEY]

Asks any OpenAI-compatible chat server for one dialogue per abstract and appends it to
``--output`` (ShareGPT JSONL); a rerun skips the finished abstracts. Endpoint forms, retries,
the API key's origin rule and resuming: ``astrollama_jax/data/qa_dialogues.py``.
"""

from __future__ import annotations

import os

from absl import flags, logging

from astrollama_jax.commands import cli
from astrollama_jax.data.qa_dialogues import Settings, run
from astrollama_jax.errors import UserError
from astrollama_jax.util import checks, tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when the command runs, so importing this module defines none)."""
  flags.DEFINE_string("abstracts", None, "JSONL of papers with id, title, abstract.")
  cli.define(
    "output", help={"output": "ShareGPT JSONL to append dialogues to (resumed if it exists)."}
  )
  flags.DEFINE_string(
    "endpoint", None, "Server base URL, .../v1, or the full .../chat/completions URL."
  )
  flags.DEFINE_string("model", None, "Model name sent to the server.")
  flags.DEFINE_string(
    "api_key_env",
    "OPENAI_API_KEY",
    "Environment variable holding the API key (optional; sent to --endpoint only).",
  )
  flags.DEFINE_integer("concurrency", 8, "Requests in flight at most.")
  flags.DEFINE_integer("max_retries", 5, "Retries per abstract on 429/5xx/timeouts.")
  flags.DEFINE_float("timeout", 60.0, "Seconds per request, the whole exchange.")
  flags.DEFINE_float("backoff_base", 1.0, "First backoff ceiling in seconds; doubles per retry.")
  flags.DEFINE_float("backoff_max", 60.0, "Longest wait between retries, Retry-After included.")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
  flags.DEFINE_float("max_reply_mb", 16.0, "Largest reply accepted, MiB.")
  flags.DEFINE_integer("limit", None, "Use only the first N lines of --abstracts.")
  flags.mark_flags_as_required(["abstracts", "output", "endpoint", "model"])


def main(argv: list[str]) -> None:
  cli.no_extra_args(argv)
  if not os.path.isfile(FLAGS.abstracts):
    raise UserError(f"--abstracts: no such file {FLAGS.abstracts}")
  checks.check_output_file(FLAGS.output)
  for name in ("timeout", "max_reply_mb"):
    if not getattr(FLAGS, name) > 0:
      raise UserError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
  api_key = os.environ.get(FLAGS.api_key_env) if FLAGS.api_key_env else None
  if not api_key:
    logging.info("no API key in $%s: sending requests without Authorization", FLAGS.api_key_env)
  settings = Settings(
    endpoint=FLAGS.endpoint,
    model=FLAGS.model,
    api_key=api_key,
    concurrency=FLAGS.concurrency,
    max_retries=FLAGS.max_retries,
    timeout=FLAGS.timeout,
    backoff_base=FLAGS.backoff_base,
    backoff_max=FLAGS.backoff_max,
    temperature=FLAGS.temperature,
    max_reply_bytes=int(FLAGS.max_reply_mb * 1024**2),
  )
  summary = run(FLAGS.abstracts, FLAGS.output, settings, limit=FLAGS.limit)
  tables.report("make_qa", summary)
