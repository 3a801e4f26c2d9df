"""Tokenizers: one interface, chosen from what the tokenizer file is.

``Tokenizer(path)`` reads the file (or model folder) at ``path`` and returns the implementation
that fits it, so every caller constructs tokenizers the same way:

- a SentencePiece model (LLaMA-2's ``tokenizer.model``): ``SentencePieceTokenizer``;
- a Hugging Face ``tokenizer.json`` (LLaMA 3's byte-level BPE): ``bpe_tokenizer.HFBPETokenizer``;
- Meta's tiktoken ranks (LLaMA 3's own ``tokenizer.model``): ``bpe_tokenizer.TiktokenTokenizer``.

A folder is read by its ``tokenizer.model`` when that is SentencePiece (exact, where an HF
``tokenizer.json`` beside it is a conversion), else by its ``tokenizer.json``, else by a tiktoken
``tokenizer.model``. Special ids (begin/end of text, end of turn, the ids that end generation)
are properties read from the tokenizer itself, never family constants.

LLaMA-2 has no pad piece; we pad with id 0 (``<unk>``) and always mask padding out with segment
id 0, so the pad id never reaches the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import os
import re

import sentencepiece as spm

SENTENCEPIECE, HF_JSON, TIKTOKEN = "sentencepiece", "tokenizer.json", "tiktoken"
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")


def _file_kind(path: str) -> str:
  """What a tokenizer file is, from its first bytes (SentencePiece is binary protobuf)."""
  with open(path, "rb") as f:
    head = f.read(512)
  if head.lstrip()[:1] == b"{":
    return HF_JSON
  if _TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0]):
    return TIKTOKEN
  return SENTENCEPIECE


def detect(path: str | os.PathLike) -> tuple[str, str]:
  """``(kind, file)``: which tokenizer ``path`` holds and the file to read it from.

  ``path`` is a tokenizer file or a model folder; raises ``FileNotFoundError`` naming it when
  there is no tokenizer there.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    model, hf = os.path.join(path, "tokenizer.model"), os.path.join(path, "tokenizer.json")
    model_kind = _file_kind(model) if os.path.isfile(model) else None
    if model_kind == SENTENCEPIECE:
      return SENTENCEPIECE, model
    if os.path.isfile(hf):
      return HF_JSON, hf
    if model_kind is not None:
      return model_kind, model
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer model not found: {path}")
  return _file_kind(path), path


def _locate(path: str | os.PathLike, kind: str) -> str:
  found, file = detect(path)
  if found != kind:
    raise ValueError(f"{file} is a {found} tokenizer, not {kind}")
  return file


class Tokenizer:
  """The tokenizer interface; ``Tokenizer(path)`` builds the implementation the file calls for.

  Implementations give ``vocab_size``, ``bos_id``, ``eos_id`` (ends a document), ``pad_id``,
  ``encode``/``encode_batch`` (plain text: special-token strings in it stay text), ``decode``,
  ``id_to_piece``, ``token_id`` (a special token's id by name), ``eot_id`` (ends a chat turn) and
  ``stop_ids`` (every id that ends generation in the family). Picklable: a copy re-reads
  ``path`` (Grain worker processes).
  """

  path: str

  def __new__(cls, path: str | os.PathLike | None = None, *args, **kwargs):
    if cls is Tokenizer:
      cls = _implementation(detect(path)[0])
    return super().__new__(cls)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def _encode(self, texts: list[str]) -> list[list[int]]:
    raise NotImplementedError

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Ids of ``text``, with the begin/end-of-text ids when asked."""
    return self.encode_batch([text], bos=bos, eos=eos)[0]

  def encode_batch(
    self, texts: Iterable[str], bos: bool = True, eos: bool = False
  ) -> list[list[int]]:
    out = self._encode(list(texts))
    return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def id_to_piece(self, i: int) -> str:
    raise NotImplementedError

  def token_id(self, token: str) -> int | None:
    """The id of special token ``token`` (e.g. ``"<|eot_id|>"``), or None if there is none."""
    return None

  def special_id(self, token: str) -> int:
    """The id of special token ``token``; a ``ValueError`` naming the file if it has none."""
    i = self.token_id(token)
    if i is None:
      raise ValueError(f"tokenizer {self.path} has no {token} token")
    return i

  @property
  def eot_id(self) -> int:
    """The id that ends a chat turn."""
    return self.eos_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id that ends generation in this tokenizer's family."""
    return (self.eos_id,)

  def check_vocab(self, model_vocab_size: int) -> None:
    """Raise if the tokenizer cannot feed a model with ``model_vocab_size`` rows."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(
        f"tokenizer {self.path} has {self.vocab_size} pieces but the model's vocab is "
        f"{model_vocab_size}: ids would index past the embedding table"
      )


class SentencePieceTokenizer(Tokenizer):
  """Thin wrapper around ``sentencepiece.SentencePieceProcessor`` (LLaMA-2)."""

  def __init__(self, path: str | os.PathLike):
    self.path = _locate(path, SENTENCEPIECE)
    self._sp = spm.SentencePieceProcessor(model_file=self.path)

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

  def _encode(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def token_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return i if i != self._sp.unk_id() or token == self._sp.id_to_piece(i) else None


def _implementation(kind: str) -> type[Tokenizer]:
  if kind == SENTENCEPIECE:
    return SentencePieceTokenizer
  from astrollama_jax.data import bpe_tokenizer  # imports tokenizers/tiktoken only when needed

  return bpe_tokenizer.HFBPETokenizer if kind == HF_JSON else bpe_tokenizer.TiktokenTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer in ``path`` (a file or a model folder); the same as ``Tokenizer(path)``."""
  return Tokenizer(path)
