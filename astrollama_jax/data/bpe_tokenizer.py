"""LLaMA 3's byte-level BPE, in the two layouts it is shipped: ``tokenizer.json`` and tiktoken.

An HF model folder's ``tokenizer.json`` is read with the ``tokenizers`` library; Meta's download's
``tokenizer.model`` (one ``base64(token bytes) rank`` line per token) with ``tiktoken``, using
LLaMA 3's pre-tokenizer regex and its 256 special tokens, which that file does not list: they
take the ids after the ranks in the order below (the names of LLaMA 3.1's ``tokenizer.json``).
Both give the same ids.

The special ids are looked up by name: ``<|begin_of_text|>`` opens a document, ``<|end_of_text|>``
ends one (how the base models separate pre-training documents), ``<|eot_id|>`` ends a chat turn,
and generation stops at any of end of text, ``<|eom_id|>`` and ``<|eot_id|>``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
import functools
import os

from astrollama_jax.data.tokenizer import HF_JSON, TIKTOKEN, Tokenizer, _locate

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
