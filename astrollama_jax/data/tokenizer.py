"""SentencePiece tokenizer wrapper: the one place that knows LLaMA-2's special ids.

LLaMA-2 has no pad piece; we pad with id 0 (``<unk>``) and always mask padding out
with segment id 0, so the pad id never reaches the loss.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
  """Thin, picklable wrapper around ``sentencepiece.SentencePieceProcessor``."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer model not found: {path}")
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)

  # Pickling (Grain worker processes) re-loads the model from its path.
  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return 0

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    ids = self._sp.encode(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(
    self, texts: Iterable[str], bos: bool = True, eos: bool = False
  ) -> list[list[int]]:
    out = self._sp.encode(list(texts))
    return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def check_vocab(self, model_vocab_size: int) -> None:
    """Raise if the tokenizer cannot feed a model with ``model_vocab_size`` rows."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(
        f"tokenizer {self.path} has {self.vocab_size} pieces but the model's vocab is "
        f"{model_vocab_size}: ids would index past the embedding table"
      )
