"""Chat SFT data: source mixtures and the Grain pipeline that feeds the trainer.

Built on two sibling modules: ``chat_formats`` (reading ShareGPT/OpenAI/UltraChat/OpenOrca/LIMA/
LMFlow into ``Conversation``) and ``chat_templates`` (a chat format as token ids and the loss
mask).

Batches have the corpus pipeline's layout, so the trainer cannot tell SFT from pre-training except
by ``loss_mask``: tokens/targets/segment_ids/positions int32, loss_mask float32, [batch, seq_len].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import os
from typing import Any

from absl import logging
import grain
import numpy as np

from astrollama_jax.data import batches
from astrollama_jax.data.chat_formats import (
  FORMATS,
  ChatFormatError,
  Conversation,
  load_conversations,
)
from astrollama_jax.data.chat_templates import LLAMA2, ChatTemplate
from astrollama_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ChatSource:
  """One file of a mixture. ``count``: take exactly this many; ``weight``: take weight x its size.

  Neither: take all of it. Taking more than the file holds repeats it (in fresh shuffles).
  """

  path: str
  format: str = "auto"
  count: int | None = None
  weight: float | None = None

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(
        f"source {self.path}: unknown format {self.format!r}; expected one of {FORMATS}"
      )
    if self.count is not None and self.weight is not None:
      raise ValueError(f"source {self.path}: give count or weight, not both")
    if self.count is not None and self.count < 0:
      raise ValueError(f"source {self.path}: count must be >= 0, got {self.count}")
    if self.weight is not None and self.weight < 0:
      raise ValueError(f"source {self.path}: weight must be >= 0, got {self.weight}")

  @classmethod
  def of(cls, spec: ChatSource | Mapping[str, Any] | Sequence[Any]) -> ChatSource:
    """From a ChatSource, a dict {path, format, count, weight} or a tuple in that order."""
    if isinstance(spec, ChatSource):
      return spec
    if isinstance(spec, Mapping):
      unknown = set(spec) - {"path", "format", "count", "weight"}
      if unknown:
        raise ValueError(f"chat source {dict(spec)}: unknown keys {sorted(unknown)}")
      return cls(**{k: v for k, v in spec.items() if v is not None or k in ("count", "weight")})
    return cls(*spec)


def _take(convs: list[Conversation], n: int, rng: np.random.Generator) -> list[Conversation]:
  """n conversations without repeats while possible, then again from a fresh shuffle."""
  out: list[Conversation] = []
  while len(out) < n and convs:
    order = rng.permutation(len(convs))[: n - len(out)]
    out += [convs[i] for i in order]
  return out


def mix_sources(
  sources: Iterable[ChatSource | Mapping[str, Any] | Sequence[Any]],
  seed: int,
  report: dict[str, dict[str, int]] | None = None,
) -> list[Conversation]:
  """Read, sample and shuffle the sources into one deterministic list of conversations.

  Each source samples with its own generator (seed, index), so changing one source's size does
  not reshuffle another's picks. ``report`` (if given) is filled with {path: {reason: count}} plus
  a "taken" count per source.
  """
  mixed: list[Conversation] = []
  for index, spec in enumerate(sources):
    src = ChatSource.of(spec)
    if not os.path.isfile(src.path):
      raise FileNotFoundError(f"chat source not found: {src.path}")
    convs, rep = load_conversations(src.path, src.format)
    if src.count is not None:
      n = src.count
    elif src.weight is not None:
      n = int(round(src.weight * len(convs)))
    else:
      n = len(convs)
    if n > len(convs):
      logging.warning("%s: %d conversations asked, %d readable: repeating", src.path, n, len(convs))
    if n and not convs:
      raise ValueError(f"chat source {src.path}: no readable conversations (report {rep})")
    picked = _take(convs, n, np.random.default_rng([seed, index]))
    mixed += picked
    rep["taken"] = len(picked)
    logging.info("chat source %s: %s", src.path, rep)
    if report is not None:
      report[src.path] = rep
  order = np.random.default_rng([seed, 1 << 30]).permutation(len(mixed))
  return [mixed[i] for i in order]


class _EncodeForTraining:
  """Picklable map: Conversation -> {tokens, targets, loss_mask}, or None when it cannot fit."""

  def __init__(self, tokenizer_path: str, seq_len: int, template: ChatTemplate):
    self.tokenizer = Tokenizer(tokenizer_path)
    self.seq_len = seq_len
    self.template = template

  def __call__(self, conversation: Conversation) -> dict[str, np.ndarray] | None:
    try:
      return self.template.encode_for_training(self.tokenizer, conversation, self.seq_len)
    except ChatFormatError as e:
      logging.warning("conversation %s skipped: %s", conversation.id, e)
      return None


def make_sft_dataset(
  sources: Iterable[ChatSource | Mapping[str, Any] | Sequence[Any]],
  tokenizer_path: str | os.PathLike,
  seq_len: int,
  batch_size: int,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  *,
  shards: int | None = None,
  num_epochs: int | None = 1,
  shuffle: bool = True,
  num_packing_bins: int = 16,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  drop_remainder: bool = True,
  chat_template: ChatTemplate = LLAMA2,
) -> grain.IterDataset:
  """Batches of packed, loss-masked conversations for this process's share of the mixture.

  Args:
    sources: the mixture, see ``mix_sources`` / ``ChatSource`` (dicts path/format/count/weight).
    tokenizer_path: SentencePiece model (LLaMA-2's ``tokenizer.model``).
    seq_len: row length. A conversation longer than that keeps its leading exchanges that fit
      (whole); one whose first exchange does not fit is skipped (logged).
    batch_size: rows per batch on this host (global batch / process_count).
    seed: mixture sampling, shuffling and packing seed; the same seed gives the same batches.
    num_epochs: passes over the mixture (reshuffled each); ``None`` repeats for ever.
    shuffle: shuffle the conversations of each epoch (the mixture itself is always shuffled).
    num_packing_bins: rows filled at once by first-fit packing (more = less padding).
    process_index, process_count, shards, worker_count, worker_buffer_size, drop_remainder:
      the layout and reading of the batches, see ``batches.packed_batches``. Every host builds
      the same mixture; data shard ``j`` of ``S`` takes every ``S``-th conversation from ``j``
      (disjoint, together complete) and shuffles, packs and batches them on its own.
    chat_template: the chat format the conversations are rendered in (``chat_templates``).

  Returns:
    ``grain.IterDataset`` of dicts ``tokens``, ``targets``, ``segment_ids``, ``positions``
    (int32) and ``loss_mask`` (float32), each ``[batch_size, seq_len]``, exactly as the corpus
    pipeline; conversations are packed whole (first fit), never split across rows. Its
    iterator has ``get_state()``/``set_state()`` for checkpointing (one state per shard).
  """
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
  conversations = mix_sources(sources, seed)
  encode = _EncodeForTraining(os.fspath(tokenizer_path), seq_len, chat_template)

  def examples(j: int, count: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(conversations)[j::count]
    if len(ds) == 0:
      raise ValueError(
        f"data shard {j} of {count} gets no conversations ({len(conversations)} in the mixture)"
        + (": lower data.shards" if count > 1 else "")
      )
    if shuffle:
      ds = ds.shuffle(seed=seed + 1)
    return ds.repeat(num_epochs).map(encode).filter(_is_example)

  return batches.packed_batches(
    examples,
    seq_len=seq_len,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    shards=shards,
    worker_count=worker_count,
    worker_buffer_size=worker_buffer_size,
    drop_remainder=drop_remainder,
    method="first_fit",
    num_packing_bins=num_packing_bins,
    packing_seed=seed,
  )


def _is_example(example: dict[str, np.ndarray] | None) -> bool:
  return example is not None
