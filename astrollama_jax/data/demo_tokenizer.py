"""The demo's own SentencePiece tokenizer, trained from the shipped demo data in about a second.

The demo needs a tokenizer, but LLaMA-2's ``tokenizer.model`` is a separate download; so the
demo trains one, the same way everywhere, from the project's own text: the training split of
``data/demo_corpus`` (the validation split stays unseen, as for the model) and the conversations
of ``data/demo_chat`` rendered in the LLaMA-2 chat format the SFT stage trains on.

It is laid out like LLaMA-2's (``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, no pad piece; BPE with
byte fallback, split digits, identity normalization, a dummy "▁" prefix), so every component
that reads ``tokenizer.model`` (data pipelines, chat template, HF export, transformers' Llama
tokenizers) takes it unchanged. Its size is the ``demo`` model preset's ``vocab_size``: a few
thousand pieces, what ~50 kB of text supports and a 2-layer model can learn.

Training is deterministic (one thread, input in a fixed order, no sampling): the same data gives
the same bytes, so a cached copy stays valid as long as the shipped data is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import os

import sentencepiece as spm

from astrollama_jax.model.config import PRESETS
from astrollama_jax.util import diskspace, resources

FILE = "tokenizer.model"
# The demo's validation share (``prepare --validation_fraction``): the tokenizer learns only
# from the records that land in the training split.
VALIDATION_FRACTION = 0.15


def vocab_size() -> int:
  """Pieces of the demo tokenizer: the ``demo`` model preset's embedding rows."""
  return int(PRESETS["demo"]["vocab_size"])


def training_texts() -> list[str]:
  """The shipped text the tokenizer learns from, in a fixed order."""
  from astrollama_jax.data import chat_formats
  from astrollama_jax.data.chat_templates import B_INST, B_SYS, E_INST, E_SYS
  from astrollama_jax.data.corpus.config import CorpusConfig
  from astrollama_jax.data.corpus.plan import collect

  config = CorpusConfig(
    sources=[str(resources.path("data", "demo_corpus"))],
    validation_fraction=VALIDATION_FRACTION,
    progress=False,
  )
  texts = [r["text"] for r in collect(config).records["train"]]
  chat_file = resources.path("data", "demo_chat", "astro_chat.jsonl")
  for conv in chat_formats.load_conversations(chat_file)[0]:
    for k, (user, reply) in enumerate(conv.exchanges):
      if k == 0 and conv.system is not None:  # as the LLaMA-2 template folds it in
        user = f"{B_SYS}{conv.system}{E_SYS}{user}"
      texts.append(f"{B_INST} {user.strip()} {E_INST} {(reply or '').strip()}")
  return texts


def train(texts: Sequence[str], size: int) -> bytes:
  """A serialized LLaMA-2-style SentencePiece BPE model of ``size`` pieces learnt from ``texts``."""
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=out,
    model_type="bpe",
    vocab_size=size,
    character_coverage=1.0,  # every character of the data is a piece; the rest: byte fallback
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    shuffle_input_sentence=False,
    input_sentence_size=0,
    max_sentence_length=1 << 20,  # whole paper sections are single "sentences"
    minloglevel=2,
  )
  return out.getvalue()


def ensure(folder: str | os.PathLike) -> str:
  """``folder/tokenizer.model``, trained from the shipped data on first use, reused afterwards
  (written atomically: an interrupted build leaves no partial model to reuse)."""
  folder = os.fspath(folder)
  path = os.path.join(folder, FILE)
  if os.path.isfile(path):
    return path
  model = train(training_texts(), vocab_size())
  os.makedirs(folder, exist_ok=True)
  diskspace.write_atomic(path, model)
  return path
