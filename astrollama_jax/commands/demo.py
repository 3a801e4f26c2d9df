r"""``python -m astrollama_jax demo --workdir=DIR``: the whole recipe, end to end, on a CPU.

0. tokenizer: the demo's own SentencePiece model (``data/demo_tokenizer.py``), trained from the
   shipped demo data into ``DIR/tokenizer`` on first use, so nothing is downloaded;
   ``--tokenizer=PATH`` (LLaMA-2's ``tokenizer.model``, say) replaces it;
1. prepare: ``data/demo_corpus`` -> ``DIR/corpus`` (TFDS ArrayRecord, 15% validation);
2. continual pre-training of a tiny LLaMA (``configs/demo.py``, one embedding row per piece of
   the tokenizer) in ``DIR/cpt``, with the validation perplexity before the first step and after
   the last;
3. chat SFT of the CPT model on ``data/demo_chat`` (``configs/demo_sft.py``) in ``DIR/sft``;
4. export: ``DIR/sft`` -> ``DIR/hf``, a Hugging Face folder (safetensors, tokenizer files with
   the LLaMA-2 chat template);
5. one chat answer from the exported folder, through the chat command's session.

The steps call the same code as ``python -m astrollama_jax prepare``, ``... .train``,
``... .export`` and ``... .chat``. Re-running resumes: a finished training run is not repeated.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import time
from typing import Any

from absl import flags, logging

from astrollama_jax import sharding
from astrollama_jax.checkpoints import loader
from astrollama_jax.commands import cli
from astrollama_jax.data import demo_tokenizer
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.errors import UserError
from astrollama_jax.util import resources, tables

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined when the command runs, so importing this module defines none)."""
  flags.DEFINE_string(
    "workdir", None, "Output folder (tokenizer/, corpus/, cpt/, sft/, hf/).", required=True
  )
  cli.define(
    "tokenizer",
    help={
      "tokenizer": "SentencePiece tokenizer.model, e.g. LLaMA-2's (default: the demo's own, "
      "trained from the shipped demo data into WORKDIR/tokenizer/)."
    },
  )
  flags.DEFINE_string("corpus", None, "Demo corpus folder (default: the shipped data/demo_corpus).")
  flags.DEFINE_integer("steps", None, "Override the number of training steps of configs/demo.py.")
  flags.DEFINE_integer(
    "sft_steps", None, "Override the number of training steps of configs/demo_sft.py."
  )
  flags.DEFINE_string(
    "question",
    "What does a high star formation rate in a galaxy tell us?",
    "The question the fine-tuned demo model answers at the end.",
  )


def find_tokenizer(explicit: str | None) -> str | None:
  """The ``--tokenizer`` file, checked now; None: the demo's own, built in the workdir."""
  if explicit and not os.path.isfile(explicit):
    raise UserError(
      f"--tokenizer {explicit} is not a file; pass a SentencePiece tokenizer.model, or leave "
      "the flag out for the demo's own tokenizer"
    )
  return os.path.abspath(explicit) if explicit else None


def load_config(path: pathlib.Path) -> Any:
  """``get_config()`` of a configs/*.py file."""
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def prepare(source: str, output: str) -> dict[str, Any]:
  from astrollama_jax.data.corpus.build import build
  from astrollama_jax.data.corpus.config import CorpusConfig

  config = CorpusConfig(sources=[source], validation_fraction=demo_tokenizer.VALIDATION_FRACTION)
  builder, report = build(config, output)
  print(report.table())
  return {"dataset": str(builder.data_dir)}


def pretrain(corpus_dir: str, tokenizer: str, workdir: str, steps: int | None) -> dict[str, Any]:
  from astrollama_jax.train import loop

  config = load_config(resources.path("configs", "demo.py"))
  config.data.lm.path = corpus_dir
  config.data.tokenizer_path = tokenizer
  # A fresh model: one embedding row per piece (the demo preset's size for the demo's own).
  config.model.vocab_size = Tokenizer(tokenizer).vocab_size
  if steps:
    config.train.num_steps = steps
  return loop.train(config, workdir)


def finetune(cpt_workdir: str, tokenizer: str, workdir: str, steps: int | None) -> dict[str, Any]:
  from astrollama_jax.train import loop

  config = load_config(resources.path("configs", "demo_sft.py"))
  config.init_checkpoint = cpt_workdir
  config.data.tokenizer_path = tokenizer
  for source in config.data.sft.sources:  # shipped data: "data/..." paths, found wherever installed
    source["path"] = str(resources.path(*pathlib.PurePosixPath(source["path"]).parts))
  if steps:
    config.train.num_steps = steps
  return loop.train(config, workdir)


def answer(hf_folder: str, question: str) -> str:
  """Greedy answer of the exported chat model, as ``python -m astrollama_jax chat`` gives it."""
  from astrollama_jax.chat_session import ChatSession
  from astrollama_jax.data.tokenizer import Tokenizer

  mesh = sharding.mesh_from_text()
  loaded = loader.load_model(hf_folder, mesh, need_tokenizer=True)
  session = ChatSession(
    loaded.cfg,
    loaded.params,
    Tokenizer(loaded.tokenizer_path),
    max_new_tokens=48,
    temperature=0.0,
    chunk_size=16,
    mesh=mesh,
  )
  return session.reply(question)


def export(checkpoint: str, output: str) -> dict[str, Any]:
  from astrollama_jax.commands import export as export_lib

  if os.path.isdir(output):  # the demo's own earlier export
    shutil.rmtree(output)
  return export_lib.export(checkpoint, output, show_progress=False)


def run(
  workdir: str,
  tokenizer: str | None,
  corpus_src: str,
  steps: int | None = None,
  sft_steps: int | None = None,
  question: str = "What is a galaxy?",
) -> dict[str, Any]:
  """All stages; returns the summary (perplexities, losses, timings, output paths).

  ``tokenizer`` None: the demo's own, built into ``workdir/tokenizer`` (reused on a re-run).
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  timings: dict[str, float] = {}

  def stage(name, fn, *args):
    t0 = time.time()
    logging.info("demo stage: %s", name)
    out = fn(*args)
    timings[name] = round(time.time() - t0, 1)
    return out

  def at(name):  # the stages' folders, all in the workdir
    return os.path.join(workdir, name)

  if tokenizer is None:
    tokenizer = stage("tokenizer", demo_tokenizer.ensure, at("tokenizer"))
  stage("prepare", prepare, corpus_src, at("corpus"))
  cpt = stage("pretrain", pretrain, at("corpus"), tokenizer, at("cpt"), steps)
  sft = stage("finetune", finetune, at("cpt"), tokenizer, at("sft"), sft_steps)
  stage("export", export, at("sft"), at("hf"))
  reply = stage("chat", answer, at("hf"), question)
  before, after = cpt.get("eval_start") or {}, cpt.get("eval") or {}
  return {
    "val_ppl_before": before.get("perplexity"),
    "val_ppl_after": after.get("perplexity"),
    "val_loss_before": before.get("loss"),
    "val_loss_after": after.get("loss"),
    "train_loss_final": cpt.get("train_loss"),
    "steps": cpt.get("final_step"),
    "sft_loss_final": sft.get("train_loss"),
    "sft_steps": sft.get("final_step"),
    "question": question,
    "answer": reply,
    "loss_fell": bool(before and after and after["loss"] < before["loss"]),
    "tokenizer": tokenizer,
    "vocab_size": Tokenizer(tokenizer).vocab_size,
    "hf_folder": at("hf"),
    "cpt_workdir": at("cpt"),
    "sft_workdir": at("sft"),
    "seconds": timings,
    "total_s": round(sum(timings.values()), 1),
  }


def main(argv: list[str]) -> None:
  cli.no_extra_args(argv)
  from astrollama_jax.train.metrics import quiet_library_logs

  quiet_library_logs()
  corpus_src = FLAGS.corpus or str(resources.path("data", "demo_corpus"))
  summary = run(
    FLAGS.workdir,
    find_tokenizer(FLAGS.tokenizer),
    corpus_src,
    FLAGS.steps,
    FLAGS.sft_steps,
    FLAGS.question,
  )
  rows = [
    ("validation perplexity, before", summary["val_ppl_before"]),
    ("validation perplexity, after", summary["val_ppl_after"]),
    ("final training loss", summary["train_loss_final"]),
    ("training steps (CPT)", summary["steps"]),
    ("final training loss (SFT)", summary["sft_loss_final"]),
    ("training steps (SFT)", summary["sft_steps"]),
    ("tokenizer pieces", summary["vocab_size"]),
    *[(f"time: {k} (s)", v) for k, v in summary["seconds"].items()],
    ("HF folder", summary["hf_folder"]),
  ]
  print(f"\n[user] {summary['question']}\n[astrollama-demo] {summary['answer']}\n")
  tables.report("demo", summary, rows, ("stage", "value"))
  if not summary["loss_fell"]:
    raise SystemExit("validation loss did not fall")
