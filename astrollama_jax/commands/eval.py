"""``python -m astrollama_jax eval``: score a checkpoint, or compare earlier results.

  --task=perplexity   token-weighted NLL / perplexity per corpus (and section), sliding window;
                      --by=month adds a row per month of the records' dates (knowledge recency)
  --task=completion   complete abstracts from their first part; embedding cosine + continuation ppl
  --task=embed        AstroLLaMA embeddings of a JSONL of abstracts; --query prints nearest papers
  --task=mcq          multiple-choice accuracy (option log-likelihood and answer-letter
                      probability); where answers are withheld, a predictions file to submit
  --task=contamination  share of each item's 13-grams found in a training corpus
  --compare=R1,R2,... a markdown table and a PNG chart of the same metrics across runs

Every task prints a table and one JSON line, and writes ``<output>/<task>.json`` (``--output``
has no default, so no run leaves results in the folder it happened to start in).
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging

from astrollama_jax.commands import cli
from astrollama_jax.util import checks

TASKS = ("perplexity", "completion", "embed", "mcq", "contamination")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``flag_values`` (tests use a private set; never on import)."""
  fv = {"flag_values": flag_values}
  flags.DEFINE_enum("task", None, TASKS, "What to evaluate.", **fv)
  flags.DEFINE_list(
    "compare", None, "Result files or output dirs to compare (instead of --task).", **fv
  )
  cli.define(
    *cli.MODEL_FLAGS,
    "output",
    flag_values=flag_values,
    help={"output": "Folder for the results files (<output>/<task>.json); no default."},
  )
  flags.DEFINE_multi_string(
    "data",
    None,
    "Evaluation data: JSONL / JSON / CSV files or a prepared "
    "dataset dir; repeatable and comma-separated (one corpus each).",
    **fv,
  )
  flags.DEFINE_string("split", "validation", "Split to read from a prepared dataset dir.", **fv)
  flags.DEFINE_string(
    "label", None, "Name of this run in comparisons (default: checkpoint name).", **fv
  )
  flags.DEFINE_integer("limit", 0, "Use at most this many items per data file (0 = all).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed for bootstrap, sampling and few-shot choice.", **fv)
  flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for 95% intervals.", **fv)
  flags.DEFINE_bool("progress", True, "Show progress bars.", **fv)
  # model / execution
  flags.DEFINE_integer("batch_size", 8, "Rows of --max_len tokens per forward pass.", **fv)
  flags.DEFINE_integer(
    "max_len", 0, "Context length for scoring (0 = the model's max_seq_len).", **fv
  )
  # perplexity
  flags.DEFINE_integer(
    "stride", 0, "Sliding-window stride for long documents (0 = max_len // 2).", **fv
  )
  flags.DEFINE_enum(
    "by",
    None,
    ["month"],
    "perplexity: also group the documents by the month of their date (the record's 'date', "
    "else its arXiv id), to see how a model does on papers newer than its training data.",
    **fv,
  )
  # completion
  flags.DEFINE_float(
    "prefix_frac",
    0.5,
    "Share of each text (by characters, cut at a sentence boundary) given as the prompt.",
    **fv,
  )
  flags.DEFINE_integer("max_new_tokens", 512, "Cap on generated tokens per completion.", **fv)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).", **fv)
  flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).", **fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold.", **fv)
  flags.DEFINE_integer("gen_batch_size", 16, "Prompts generated together.", **fv)
  flags.DEFINE_string(
    "embedder",
    None,
    "Checkpoint for completion embeddings (default: the evaluated model itself).",
    **fv,
  )
  # embed
  flags.DEFINE_string("query", None, "embed: print the papers nearest to this text.", **fv)
  flags.DEFINE_integer("neighbours", 5, "embed: how many nearest papers to show / use.", **fv)
  flags.DEFINE_string(
    "embeddings", None, "embed: reuse this embeddings .npz instead of recomputing.", **fv
  )
  # mcq
  flags.DEFINE_enum("method", "all", ["all", "loglik", "letter"], "mcq scoring method(s).", **fv)
  flags.DEFINE_integer("shots", 0, "mcq: few-shot examples in each prompt.", **fv)
  flags.DEFINE_string(
    "dev", None, "mcq: file of few-shot examples (default: other items of --data).", **fv
  )
  flags.DEFINE_string("subject", None, "mcq: subject named in the prompt header.", **fv)
  # contamination
  flags.DEFINE_multi_string(
    "train_data",
    None,
    "Training corpora (JSONL or prepared dataset "
    "dir) for the contamination check; with a scoring task, items are "
    "checked.",
    **fv,
  )
  flags.DEFINE_string(
    "train_split", "train", "Split of a prepared dataset used as training corpus.", **fv
  )
  flags.DEFINE_integer("ngram", 13, "Contamination n-gram length (words).", **fv)
  flags.DEFINE_float(
    "threshold", 0.5, "Flag items with more than this share of n-grams found.", **fv
  )
  flags.DEFINE_bool("drop_contaminated", False, "Score without the flagged items.", **fv)
  # compare
  flags.DEFINE_string(
    "compare_out", None, "Prefix of the comparison .md/.png (default: <output>/comparison).", **fv
  )


def _checker(F: flags.FlagValues):
  from astrollama_jax.eval import common, contamination

  specs = common.split_specs(F.train_data)
  if not specs:
    return None
  return contamination.Checker(
    specs, F.ngram, F.threshold, F.train_split, F.drop_contaminated, F.progress
  )


def main(argv, F: flags.FlagValues = flags.FLAGS):
  """Dispatch on --compare or --task (``F``: the parsed flags; absl's global ones by default)."""
  cli.no_extra_args(argv)
  from astrollama_jax.eval import common

  if F.compare:
    from astrollama_jax.eval import compare

    if not (F.compare_out or F.output):
      raise app.UsageError("--compare needs --compare_out=PREFIX or --output=DIR")
    compare.run(F.compare, F.compare_out or os.path.join(F.output, "comparison"))
    return
  if not F.task:
    raise app.UsageError("give --task=" + "|".join(TASKS) + " or --compare=RESULT1,RESULT2")
  if not F.output:  # results land where the user says, never in whatever folder we run from
    raise app.UsageError(f"--task={F.task} needs --output=DIR (the folder for {F.task}.json)")
  data = common.split_specs(F.data)
  label = F.label or common.default_label(F.checkpoint or "")

  if F.task == "contamination":
    from astrollama_jax.eval import contamination, mcq

    checker = _checker(F)
    if checker is None or not data:
      raise app.UsageError("--task=contamination needs --data and --train_data")
    items = []
    for spec in data:
      is_mcq = spec.endswith(".csv") or mcq.looks_like_mcq(spec)
      items += (
        mcq.read_questions(spec, F.limit) if is_mcq else common.read_texts(spec, F.split, F.limit)
      )
    contamination.run(items, checker, F.output, label, ",".join(data))
    return

  reuse = F.task == "embed" and F.embeddings and os.path.exists(F.embeddings)
  if reuse and not F.query:
    raise app.UsageError("--embeddings without --query has nothing to do")
  if not F.checkpoint:
    raise app.UsageError(f"--task={F.task} needs --checkpoint")
  if not data and not reuse:
    raise app.UsageError(f"--task={F.task} needs --data")

  checks.check_output_dir(F.output, empty=False)
  from astrollama_jax.data.tokenizer import Tokenizer

  model = common.load(F.checkpoint, F.mesh, F.dtype, F.compute_dtype, F.tokenizer, F.attention)
  tokenizer = Tokenizer(model.tokenizer_path)
  if F.task == "perplexity":
    args = dict(stride=F.stride, split=F.split, n_boot=F.bootstrap, seed=F.seed, by=F.by)
  elif F.task == "mcq":
    args = dict(method=F.method, shots=F.shots, dev=F.dev, subject=F.subject, seed=F.seed)
  elif F.task == "embed":
    args = dict(query=F.query, neighbours=F.neighbours, embeddings_file=F.embeddings, split=F.split)
  else:
    embedder = None
    if F.embedder:
      embedder = common.load(F.embedder, F.mesh, F.dtype, F.compute_dtype, F.tokenizer, F.attention)
    sampling = ("prefix_frac", "max_new_tokens", "temperature", "top_k", "top_p", "gen_batch_size")
    args = {name: getattr(F, name) for name in sampling}
    args.update(embedder=embedder, split=F.split, n_boot=F.bootstrap, seed=F.seed)
  if F.task != "embed":  # the scoring tasks may leave out what the training data holds
    args["checker"] = _checker(F)
  task = importlib.import_module(f"astrollama_jax.eval.{F.task}")
  setup = common.TaskSetup(
    model, tokenizer, F.output, label, F.batch_size, F.max_len, F.limit, F.progress
  )
  task.run(setup, data, **args)
  logging.info("results in %s", F.output)
