"""Tokenizers: one interface, chosen from what the tokenizer file is.

``Tokenizer(path)`` reads the file (or model folder) at ``path`` and returns the implementation
that fits it, so every caller constructs tokenizers the same way:

- a SentencePiece model (LLaMA-2's ``tokenizer.model``): ``SentencePieceTokenizer``;
- a Hugging Face ``tokenizer.json`` (LLaMA 3's byte-level BPE): ``HFBPETokenizer``;
- Meta's tiktoken ranks (LLaMA 3's own ``tokenizer.model``): ``TiktokenTokenizer``.

A folder is read by its ``tokenizer.model`` when that is SentencePiece (exact, where an HF
``tokenizer.json`` beside it is a conversion), else by its ``tokenizer.json``, else by a tiktoken
``tokenizer.model``. Special ids (begin/end of text, end of turn, the ids that end generation)
are properties read from the tokenizer itself, never family constants.

LLaMA-2 has no pad piece; we pad with id 0 (``<unk>``) and always mask padding out with segment
id 0, so the pad id never reaches the loss.
"""

from __future__ import annotations

import abc
import base64
from collections.abc import Iterable, Sequence
import functools
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


class Tokenizer(abc.ABC):
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

  @abc.abstractmethod
  def _encode(self, texts: list[str]) -> list[list[int]]: ...

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    """Ids of ``text``, with the begin/end-of-text ids when asked."""
    return self.encode_batch([text], bos=bos, eos=eos)[0]

  def encode_batch(
    self, texts: Iterable[str], bos: bool = True, eos: bool = False
  ) -> list[list[int]]:
    out = self._encode(list(texts))
    return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str: ...

  @abc.abstractmethod
  def id_to_piece(self, i: int) -> str: ...

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


# --- LLaMA 3's byte-level BPE ---------------------------------------------------------------
#
# LLaMA 3's byte-level BPE, in the two layouts it is shipped: ``tokenizer.json`` and tiktoken.
#
# An HF model folder's ``tokenizer.json`` is read with the ``tokenizers`` library; Meta's download's
# ``tokenizer.model`` (one ``base64(token bytes) rank`` line per token) with ``tiktoken``, using
# LLaMA 3's pre-tokenizer regex and its 256 special tokens, which that file does not list: they
# take the ids after the ranks in the order below (the names of LLaMA 3.1's ``tokenizer.json``).
# Both give the same ids.
#
# The special ids are looked up by name: ``<|begin_of_text|>`` opens a document, ``<|end_of_text|>``
# ends one (how the base models separate pre-training documents), ``<|eot_id|>`` ends a chat turn,
# and generation stops at any of end of text, ``<|eom_id|>`` and ``<|eot_id|>``.

BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
EOM, EOT, PAD = "<|eom_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
NUM_SPECIAL = 256
_NAMED = [
  BEGIN_OF_TEXT,
  END_OF_TEXT,
  "<|reserved_special_token_0|>",
  "<|reserved_special_token_1|>",
  PAD,
  "<|reserved_special_token_2|>",
  START_HEADER,
  END_HEADER,
  EOM,
  EOT,
  "<|python_tag|>",
]
SPECIAL_TOKENS = tuple(
  _NAMED + [f"<|reserved_special_token_{3 + i}|>" for i in range(NUM_SPECIAL - len(_NAMED))]
)
# LLaMA 3's pre-tokenizer (Meta's reference tokenizer, and the Split in its tokenizer.json).
PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class _BPETokenizer(Tokenizer):
  """What both layouts share: the special ids, found by name."""

  _specials: dict[str, int]

  def _special_ids(self) -> None:
    for name in (BEGIN_OF_TEXT, END_OF_TEXT):
      if name not in self._specials:
        raise ValueError(f"tokenizer {self.path} has no {name} token: not a LLaMA 3 tokenizer")

  def token_id(self, token: str) -> int | None:
    return self._specials.get(token)

  @property
  def bos_id(self) -> int:
    return self._specials[BEGIN_OF_TEXT]

  @property
  def eos_id(self) -> int:
    return self._specials[END_OF_TEXT]

  @property
  def pad_id(self) -> int:  # padding is masked out; any id would do, this one is meant for it
    return self._specials.get(PAD, self.eos_id)

  @property
  def eot_id(self) -> int:
    return self._specials.get(EOT, self.eos_id)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return tuple(self._specials[t] for t in (END_OF_TEXT, EOM, EOT) if t in self._specials)

  @property
  def start_header_id(self) -> int:
    return self.special_id(START_HEADER)

  @property
  def end_header_id(self) -> int:
    return self.special_id(END_HEADER)


class HFBPETokenizer(_BPETokenizer):
  """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library.

  Text is encoded without the file's post-processor (we add begin/end of text ourselves) and with
  special-token strings kept as text, so a document cannot smuggle in a control id.
  """

  def __init__(self, path: str | os.PathLike):
    import tokenizers

    self.path = _locate(path, HF_JSON)
    self._tok = tokenizers.Tokenizer.from_file(self.path)
    self._tok.encode_special_tokens = True
    self._specials = {
      t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
    }
    self._special_ids()

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


@functools.cache
def _byte_chars() -> list[str]:
  """GPT-2's byte -> printable character map, how ``tokenizer.json`` spells token bytes."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  keep += range(ord("®"), ord("ÿ") + 1)
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b], extra = chr(256 + extra), extra + 1
  return [chars[b] for b in range(256)]


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
  """``{token bytes: rank}`` from a tiktoken BPE file; a ``ValueError`` names a bad line."""
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}:{n}: not a 'base64 rank' tiktoken line") from e
  return ranks


class TiktokenTokenizer(_BPETokenizer):
  """Meta's ``tokenizer.model`` (tiktoken ranks) with LLaMA 3's regex and special tokens."""

  def __init__(self, path: str | os.PathLike):
    import tiktoken

    self.path = _locate(path, TIKTOKEN)
    ranks = read_tiktoken_ranks(self.path)
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
      raise ValueError(f"{self.path}: ranks are not 0..{n - 1} each once")
    self._specials = {t: n + k for k, t in enumerate(SPECIAL_TOKENS)}
    self._pieces = {i: t for t, i in self._specials.items()}
    self._enc = tiktoken.Encoding(
      name=os.path.basename(self.path),
      pat_str=PATTERN,
      mergeable_ranks=ranks,
      special_tokens=self._specials,
    )
    self._special_ids()

  @property
  def vocab_size(self) -> int:
    return self._enc.n_vocab

  def _encode(self, texts: list[str]) -> list[list[int]]:
    return [self._enc.encode_ordinary(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    i = int(i)
    if i in self._pieces:
      return self._pieces[i]
    chars = _byte_chars()
    return "".join(chars[b] for b in self._enc.decode_single_token_bytes(i))


def _implementation(kind: str) -> type[Tokenizer]:
  return {SENTENCEPIECE: SentencePieceTokenizer, HF_JSON: HFBPETokenizer}.get(
    kind, TiktokenTokenizer
  )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer in ``path`` (a file or a model folder); the same as ``Tokenizer(path)``."""
  return Tokenizer(path)
