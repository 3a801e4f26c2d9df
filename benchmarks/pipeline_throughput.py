r"""Tokens per second of the whole CPT input pipeline, next to raw SentencePiece encoding.

  python benchmarks/pipeline_throughput.py \
      --abstracts=../shared/data/arxiv-astro-ph/abstracts.jsonl \
      --tokenizer=../shared/data/tokenizer/llama2/tokenizer.model

Builds the corpus from the abstracts (once, in a temporary folder unless --data_dir is
given), then, in each of ``--rounds`` interleaved rounds and for each worker count, times
(a) raw ``Tokenizer.encode`` of the abstract texts in as many processes as the pipeline has
workers (one for 0 workers), and (b) ``make_lm_dataset`` (read ArrayRecord -> shuffle ->
tokenize -> pack -> batch) with each ``--read_options`` setting, counting non-padding tokens
after the first batch (so worker start-up is excluded). The figure of merit is the pipeline's
tokens/s over raw SentencePiece's with the same number of processes ("per worker"): the
pipeline's own overhead, whatever the load on the machine. Medians over the rounds; a table,
then one JSON line.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

from absl import app, flags
import grain

from astrollama_jax.data import packing, pipeline, sources
from astrollama_jax.data.corpus.build import build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.tokenizer import Tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("abstracts", "../shared/data/arxiv-astro-ph/abstracts.jsonl", "JSONL input.")
flags.DEFINE_string("tokenizer", "../shared/data/tokenizer/llama2/tokenizer.model", "SP model.")
flags.DEFINE_string("data_dir", None, "Existing prepared corpus (skips the build).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to time.")
flags.DEFINE_list(
  "read_options",
  ["grain", "auto"],
  "Grain read options to time: grain (Grain's defaults), auto (packing.read_options of the "
  "worker count), or THREADS:BUFFER.",
)
flags.DEFINE_integer("shards", 1, "Data shards read side by side (0: one per row of a batch).")
flags.DEFINE_integer("seq_len", 2048, "Row length.")
flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
flags.DEFINE_integer("batches", 40, "Batches timed per setting (after one warm-up batch).")
flags.DEFINE_integer("raw_texts", 3000, "Abstracts encoded for the raw SentencePiece rate.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds; medians are reported.")

_TOK: Tokenizer | None = None


def _load(path: str) -> None:
  global _TOK
  _TOK = Tokenizer(path)


def _encode(texts: list[str]) -> int:
  return sum(len(_TOK.encode(t, bos=True, eos=True)) for t in texts)


def raw_sentencepiece(texts: list[str], processes: int) -> float:
  """Tokens/s of ``Tokenizer.encode`` over ``texts`` split over ``processes`` processes (started
  and with the model loaded before the clock starts)."""
  if processes <= 1:
    _load(FLAGS.tokenizer)
    start = time.perf_counter()
    n = _encode(texts)
    return n / (time.perf_counter() - start)
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(processes, initializer=_load, initargs=(FLAGS.tokenizer,)) as pool:
    pool.map(_encode, [texts[:1]] * processes)  # every process started and loaded
    start = time.perf_counter()
    n = sum(pool.map(_encode, [texts[i::processes] for i in range(processes)]))
    return n / (time.perf_counter() - start)


def options_of(name: str, workers: int) -> grain.ReadOptions:
  if name == "grain":
    return grain.ReadOptions()
  if name == "auto":
    return packing.read_options(workers, streams=FLAGS.shards or FLAGS.batch_size)
  threads, buffer = (int(x) for x in name.split(":"))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def time_pipeline(data_dir: str, workers: int, options: grain.ReadOptions) -> dict:
  chosen = packing.read_options
  packing.read_options = lambda *_, **__: options  # the builders ask packing for theirs
  try:
    ds = pipeline.make_lm_dataset(
      data_dir,
      "train",
      FLAGS.tokenizer,
      FLAGS.seq_len,
      FLAGS.batch_size,
      seed=0,
      process_index=0,
      process_count=1,
      shards=FLAGS.shards or FLAGS.batch_size,
      worker_count=workers,
    )
  finally:
    packing.read_options = chosen
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
  return {"tokens_per_s": real / elapsed, "packing_efficiency": real / slots, "tokens": real}


def main(argv: list[str]) -> None:
  del argv
  texts = [r["abstract"] for _, r in sources.read_jsonl(FLAGS.abstracts)][: FLAGS.raw_texts]
  workers = [int(w) for w in FLAGS.workers]
  raw: dict[int, list[float]] = {w: [] for w in workers}
  runs: dict[tuple[int, str], list[dict]] = {
    (w, o): [] for w in workers for o in FLAGS.read_options
  }
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = FLAGS.data_dir
    if data_dir is None:
      data_dir = os.path.join(tmp, "corpus")
      build(CorpusConfig(sources=[FLAGS.abstracts], progress=False), data_dir)
    for _ in range(FLAGS.rounds):
      for w in workers:
        raw[w].append(raw_sentencepiece(texts, max(1, w)))
        for o in FLAGS.read_options:
          runs[w, o].append(time_pipeline(data_dir, w, options_of(o, w)))
  rows = []
  for (w, o), rs in runs.items():
    opts = options_of(o, w)
    rate = statistics.median(r["tokens_per_s"] for r in rs)
    ratios = [r["tokens_per_s"] / sp for r, sp in zip(rs, raw[w])]  # paired within a round
    rows.append(
      {
        "workers": w,
        "read_options": o,
        "num_threads": opts.num_threads,
        "prefetch_buffer_size": opts.prefetch_buffer_size,
        "tokens_per_s": round(rate),
        "raw_sentencepiece_tokens_per_s": round(statistics.median(raw[w])),
        "vs_raw_per_worker": round(statistics.median(ratios), 3),
        "vs_raw_per_worker_all": [round(x, 3) for x in ratios],
        "packing_efficiency": round(statistics.median(r["packing_efficiency"] for r in rs), 4),
      }
    )
  print(
    f"\nabstracts: {len(texts)} texts for raw SentencePiece; seq_len {FLAGS.seq_len}, batch "
    f"{FLAGS.batch_size}, {FLAGS.shards or FLAGS.batch_size} data shards, {FLAGS.batches} "
    f"batches timed; median of {FLAGS.rounds} rounds; "
    f"{os.cpu_count()} CPU cores"
  )
  print(
    f"{'workers':>7s} {'read options':>16s} {'tokens/s':>10s} {'raw SP, same procs':>18s} "
    f"{'per worker':>10s} {'packing':>8s}"
  )
  for r in rows:
    opts = f"{r['read_options']} ({r['num_threads']}, {r['prefetch_buffer_size']})"
    print(
      f"{r['workers']:>7d} {opts:>16s} {r['tokens_per_s']:>10,d} "
      f"{r['raw_sentencepiece_tokens_per_s']:>18,d} {r['vs_raw_per_worker']:>10.2f} "
      f"{r['packing_efficiency']:>8.1%}"
    )
  print(
    json.dumps(
      {
        "benchmark": "pipeline_throughput",
        "pipeline": rows,
        "rounds": FLAGS.rounds,
        "raw_texts": len(texts),
        "seq_len": FLAGS.seq_len,
        "batch_size": FLAGS.batch_size,
        "shards": FLAGS.shards or FLAGS.batch_size,
        "batches": FLAGS.batches,
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
