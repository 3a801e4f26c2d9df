"""``python -m astrollama_jax.eval``: score a checkpoint, or compare earlier results.

  --task=perplexity   token-weighted NLL / perplexity per corpus (and section), sliding window
  --task=completion   complete abstracts from their first part; embedding cosine + continuation ppl
  --task=embed        AstroLLaMA embeddings of a JSONL of abstracts; --query prints nearest papers
  --task=mcq          multiple-choice accuracy (option log-likelihood and answer-letter probability)
  --task=contamination  share of each item's 13-grams found in a training corpus
  --compare=R1,R2,... a markdown table and a PNG chart of the same metrics across runs

Every task prints a table and one JSON line, and writes ``<output_dir>/<task>.json``.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

TASKS = ("perplexity", "completion", "embed", "mcq", "contamination")

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", None, TASKS, "What to evaluate.")
flags.DEFINE_list("compare", None, "Result files or output dirs to compare (instead of --task).")
flags.DEFINE_string("checkpoint", None, "HF folder, converted dir, training workdir or step folder.")
flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: the checkpoint's).")
flags.DEFINE_multi_string("data", None, "Evaluation data: JSONL / CSV files or a prepared dataset "
                          "dir; repeatable and comma-separated (one corpus each).")
flags.DEFINE_string("split", "validation", "Split to read from a prepared dataset dir.")
flags.DEFINE_string("output_dir", "eval_results", "Where results files go.")
flags.DEFINE_string("label", None, "Name of this run in comparisons (default: checkpoint name).")
flags.DEFINE_integer("limit", 0, "Use at most this many items per data file (0 = all).")
flags.DEFINE_integer("seed", 0, "Seed for bootstrap, sampling and few-shot choice.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for 95% intervals.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
# model / execution
flags.DEFINE_string("mesh", "1,-1,1", "Mesh shape data,fsdp,tensor (one entry may be -1).")
flags.DEFINE_integer("batch_size", 8, "Rows of --max_len tokens per forward pass.")
flags.DEFINE_integer("max_len", 0, "Context length for scoring (0 = the model's max_seq_len).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Parameter dtype on load.")
flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16", "float16"],
                  "Activation dtype (default: the checkpoint config's).")
# perplexity
flags.DEFINE_integer("stride", 0, "Sliding-window stride for long documents (0 = max_len // 2).")
# completion
flags.DEFINE_float("prefix_frac", 0.5, "Share of each text (by characters, cut at a sentence "
                   "boundary) given as the prompt.")
flags.DEFINE_integer("max_new_tokens", 512, "Cap on generated tokens per completion.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold.")
flags.DEFINE_integer("gen_batch_size", 16, "Prompts generated together.")
flags.DEFINE_string("embedder", None, "Checkpoint for completion embeddings (default: the "
                    "evaluated model itself).")
# embed
flags.DEFINE_string("query", None, "embed: print the papers nearest to this text.")
flags.DEFINE_integer("neighbours", 5, "embed: how many nearest papers to show / use.")
flags.DEFINE_string("embeddings", None, "embed: reuse this embeddings .npz instead of recomputing.")
# mcq
flags.DEFINE_enum("method", "all", ["all", "loglik", "letter"], "mcq scoring method(s).")
flags.DEFINE_integer("shots", 0, "mcq: few-shot examples in each prompt.")
flags.DEFINE_string("dev", None, "mcq: file of few-shot examples (default: other items of --data).")
flags.DEFINE_string("subject", None, "mcq: subject named in the prompt header.")
# contamination
flags.DEFINE_multi_string("train_data", None, "Training corpora (JSONL or prepared dataset dir) "
                          "for the contamination check; with a scoring task, items are checked.")
flags.DEFINE_string("train_split", "train", "Split of a prepared dataset used as training corpus.")
flags.DEFINE_integer("ngram", 13, "Contamination n-gram length (words).")
flags.DEFINE_float("threshold", 0.5, "Flag items with more than this share of n-grams found.")
flags.DEFINE_bool("drop_contaminated", False, "Score without the flagged items.")
# compare
flags.DEFINE_string("compare_out", None, "Prefix of the comparison .md/.png "
                    "(default: <output_dir>/comparison).")


def _checker():
  from astrollama_jax.eval import common, contamination
  specs = common.split_specs(FLAGS.train_data)
  if not specs:
    return None
  return contamination.Checker(specs, FLAGS.ngram, FLAGS.threshold, FLAGS.train_split,
                               FLAGS.drop_contaminated, FLAGS.progress)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from astrollama_jax.eval import common

  if FLAGS.compare:
    from astrollama_jax.eval import compare
    out = FLAGS.compare_out or os.path.join(FLAGS.output_dir, "comparison")
    compare.run(FLAGS.compare, out)
    return
  if not FLAGS.task:
    raise app.UsageError("give --task=" + "|".join(TASKS) + " or --compare=RESULT1,RESULT2")
  data = common.split_specs(FLAGS.data)
  label = FLAGS.label or common.default_label(FLAGS.checkpoint or "")

  if FLAGS.task == "contamination":
    from astrollama_jax.eval import contamination, mcq
    checker = _checker()
    if checker is None or not data:
      raise app.UsageError("--task=contamination needs --data and --train_data")
    items = []
    for spec in data:
      items += (mcq.read_questions(spec, FLAGS.limit) if spec.endswith(".csv")
                or mcq.looks_like_mcq(spec) else common.read_texts(spec, FLAGS.split, FLAGS.limit))
    contamination.run(items, checker, FLAGS.output_dir, label, ",".join(data))
    return

  if FLAGS.task == "embed" and FLAGS.embeddings and os.path.exists(FLAGS.embeddings) \
      and not FLAGS.query:
    raise app.UsageError("--embeddings without --query has nothing to do")
  if not FLAGS.checkpoint:
    raise app.UsageError(f"--task={FLAGS.task} needs --checkpoint")
  if not data and not (FLAGS.task == "embed" and FLAGS.embeddings):
    raise app.UsageError(f"--task={FLAGS.task} needs --data")

  from astrollama_jax.data.tokenizer import Tokenizer
  model = common.load(FLAGS.checkpoint, FLAGS.mesh, FLAGS.dtype, FLAGS.compute_dtype,
                      FLAGS.tokenizer)
  tokenizer = Tokenizer(model.tokenizer_path)
  common_kw = dict(tokenizer=tokenizer, output_dir=FLAGS.output_dir, label=label,
                   batch_size=FLAGS.batch_size, max_len=FLAGS.max_len, progress=FLAGS.progress)

  if FLAGS.task == "perplexity":
    from astrollama_jax.eval import perplexity
    perplexity.run(model, data, stride=FLAGS.stride, limit=FLAGS.limit, split=FLAGS.split,
                   n_boot=FLAGS.bootstrap, seed=FLAGS.seed, checker=_checker(), **common_kw)
  elif FLAGS.task == "mcq":
    from astrollama_jax.eval import mcq
    mcq.run(model, data, method=FLAGS.method, shots=FLAGS.shots, dev=FLAGS.dev,
            subject=FLAGS.subject, limit=FLAGS.limit, seed=FLAGS.seed, checker=_checker(),
            **common_kw)
  elif FLAGS.task == "embed":
    from astrollama_jax.eval import embed
    embed.run(model, data, query=FLAGS.query, neighbours=FLAGS.neighbours,
              embeddings_file=FLAGS.embeddings, limit=FLAGS.limit, split=FLAGS.split, **common_kw)
  elif FLAGS.task == "completion":
    from astrollama_jax.eval import completion
    embedder = None
    if FLAGS.embedder:
      embedder = common.load(FLAGS.embedder, FLAGS.mesh, FLAGS.dtype, FLAGS.compute_dtype,
                             FLAGS.tokenizer)
    completion.run(model, data, embedder=embedder, prefix_frac=FLAGS.prefix_frac,
                   max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                   top_k=FLAGS.top_k, top_p=FLAGS.top_p, gen_batch_size=FLAGS.gen_batch_size,
                   limit=FLAGS.limit, split=FLAGS.split, n_boot=FLAGS.bootstrap, seed=FLAGS.seed,
                   checker=_checker(), **common_kw)
  logging.info("results in %s", FLAGS.output_dir)


if __name__ == "__main__":
  app.run(main)
