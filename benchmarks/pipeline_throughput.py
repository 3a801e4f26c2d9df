r"""Tokens per second of the whole CPT input pipeline, next to raw SentencePiece encoding.

  python benchmarks/pipeline_throughput.py \
      --abstracts=../shared/data/arxiv-astro-ph/abstracts.jsonl \
      --tokenizer=../shared/data/tokenizer/llama2/tokenizer.model

Builds the corpus from the abstracts (once, in a temporary folder unless --data_dir is
given), then times: (a) ``Tokenizer.encode`` over the abstract texts in one process, and
(b) ``make_lm_dataset`` (read ArrayRecord -> shuffle -> tokenize -> pack -> batch) with
0, 1 and 2 Grain workers and each ``--shards`` count (data shards read side by side by this one
process, as a single-process training run does with ``data.shards``), counting non-padding
tokens and batches after the first batch (so worker start-up is excluded). Prints a table and
one JSON line.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import tempfile
import time

from absl import app, flags

from astrollama_jax.data import corpus, pipeline, sources
from astrollama_jax.data.tokenizer import Tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("abstracts", "../shared/data/arxiv-astro-ph/abstracts.jsonl", "JSONL input.")
flags.DEFINE_string("tokenizer", "../shared/data/tokenizer/llama2/tokenizer.model", "SP model.")
flags.DEFINE_string("data_dir", None, "Existing prepared corpus (skips the build).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to time.")
flags.DEFINE_list("shards", ["1", "0"], "Data shard counts to time (0: one per row of a batch).")
flags.DEFINE_integer("seq_len", 2048, "Row length.")
flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
flags.DEFINE_integer("batches", 40, "Batches timed per setting (after one warm-up batch).")


def raw_sentencepiece(tok: Tokenizer, texts: list[str]) -> tuple[float, int]:
  start = time.perf_counter()
  n = sum(len(tok.encode(t, bos=True, eos=True)) for t in texts)
  return n / (time.perf_counter() - start), n


def time_pipeline(data_dir: str, workers: int, shards: int) -> dict:
  shards = shards or FLAGS.batch_size
  ds = pipeline.make_lm_dataset(
    data_dir,
    "train",
    FLAGS.tokenizer,
    FLAGS.seq_len,
    FLAGS.batch_size,
    seed=0,
    process_index=0,
    process_count=1,
    shards=shards,
    worker_count=workers,
  )
  it = iter(ds)
  next(it)  # warm-up: worker start, first reads
  real = slots = 0
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    r, s = pipeline.count_tokens(next(it))
    real, slots = real + r, slots + s
  elapsed = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return {
    "workers": workers,
    "shards": shards,
    "batches_per_s": FLAGS.batches / elapsed,
    "tokens_per_s": real / elapsed,
    "packing_efficiency": real / slots,
    "tokens": real,
    "seconds": elapsed,
  }


def main(argv: list[str]) -> None:
  del argv
  tok = Tokenizer(FLAGS.tokenizer)
  texts = [r["abstract"] for _, r in sources.read_jsonl(FLAGS.abstracts)]
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = FLAGS.data_dir
    if data_dir is None:
      data_dir = os.path.join(tmp, "corpus")
      corpus.build(corpus.CorpusConfig(sources=[FLAGS.abstracts], progress=False), data_dir)
    sp_rate, sp_tokens = raw_sentencepiece(tok, texts)
    rows = [time_pipeline(data_dir, int(w), int(n)) for w in FLAGS.workers for n in FLAGS.shards]
  print(
    f"\nabstracts: {len(texts)} texts, {sp_tokens} tokens; seq_len {FLAGS.seq_len}, "
    f"batch {FLAGS.batch_size}, {FLAGS.batches} batches timed; {os.cpu_count()} CPU cores"
  )
  print(f"{'setting':34s} {'tokens/s':>12s} {'vs raw SP':>10s} {'packing':>8s} {'batch/s':>8s}")
  print(f"{'raw SentencePiece encode':34s} {sp_rate:12,.0f} {1.0:10.2f} {'-':>8s} {'-':>8s}")
  for r in rows:
    name = f"pipeline, {r['workers']} workers, {r['shards']} shards"
    print(
      f"{name:34s} {r['tokens_per_s']:12,.0f} {r['tokens_per_s'] / sp_rate:10.2f} "
      f"{r['packing_efficiency']:8.1%} {r['batches_per_s']:8.1f}"
    )
  print(
    json.dumps(
      {
        "benchmark": "pipeline_throughput",
        "raw_sentencepiece_tokens_per_s": round(sp_rate),
        "pipeline": [
          {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
        "seq_len": FLAGS.seq_len,
        "batch_size": FLAGS.batch_size,
        "cpu_count": os.cpu_count(),
        "versions": {
          "python": platform.python_version(),
          **{
            p: importlib.metadata.version(p)
            for p in ("grain", "sentencepiece", "tensorflow-datasets", "array-record", "numpy")
          },
        },
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
