"""The continual pre-training input pipeline: ArrayRecord corpus -> Grain -> packed batches.

    ds = make_lm_dataset(data_dir, "train", tokenizer_path, seq_len=2048, batch_size=8, seed=0)
    it = iter(ds)
    batch = next(it)            # dict of [batch_size, seq_len] arrays, see packing.py
    state = it.get_state()      # save with the checkpoint ...
    it.set_state(state)         # ... and the next batches are those of an uninterrupted run

Order of operations, and why:
  source (the split's ArrayRecord shards, random access, the text field only: corpus.TextSource)
  -> per mixture component (a section, date bounds or both: ``_components``): its record
     indices (``section_index.npz``, ``record_keys.npz``); no mixture: every record
  -> per data shard ``j`` of ``S`` (``shards.py``): records ``ds[j::S]``; shards are fixed for
     the run, independent of the process count, disjoint and together the whole split
  -> repeat(num_epochs) with a seeded shuffle per epoch (``_EpochShuffled``)
  -> tokenize (SentencePiece; ``[BOS] + ids + [EOS]``) into next-token examples
  -> mix components by weight (``MapDataset.mix``; still random access, so cheap to checkpoint)
  -> the tail every kind shares (``batches.packed_batches``): to_iter_dataset (read-ahead:
     ``packing.read_options``) -> pack (``packing.pack_examples``) -> batch of global_batch / S
     rows -> this process's shards side by side (``shards.ShardedBatches``) -> ``mp_prefetch``
Everything before packing is index-based; packing and batching are Grain iterators with
checkpointable state (one per shard, so a checkpoint resumes on another process count), and
``mp_prefetch`` checkpoints its workers' states too.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import sys

import grain
import numpy as np

from astrollama_jax.data import batches, packing
from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.tokenizer import Tokenizer


class _Subset:
  """Records ``indices`` of ``source``, as a random-access source of decoded text."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    return self._source[int(self._indices[i])]

  def __repr__(self) -> str:
    return f"_Subset({len(self)} of {len(self._source)})"


class _EpochShuffled:
  """``num_epochs`` passes over ``source``, each in its own seeded random order.

  Random access: index i is record ``perm[e][i % n]`` with ``e = i // n`` and
  ``perm[e] = default_rng((seed, e)).permutation(n)``. (Grain's ``shuffle().repeat()``
  does the same but re-derives its permutation often enough to cost ~30 ms per record
  on tiny sections such as the demo's four introductions.)
  """

  def __init__(self, source, seed: int, num_epochs: int | None, shuffle: bool):
    self._source = source
    self._n = len(source)
    self._seed = seed
    self._shuffle = shuffle
    self._len = sys.maxsize if num_epochs is None else self._n * num_epochs
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._len

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      if len(self._perms) > 4:
        self._perms.clear()
      perm = np.random.default_rng((self._seed, epoch)).permutation(self._n)
      self._perms[epoch] = perm
    return perm

  def __getitem__(self, i: int):
    if not 0 <= i < self._len:
      raise IndexError(i)
    epoch, j = divmod(int(i), self._n)
    return self._source[int(self._perm(epoch)[j]) if self._shuffle else j]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_perms"} | {"_perms": {}}


class _Tokenize:
  """Record -> next-token example; picklable (Grain workers re-load the model by path)."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, record: dict) -> dict:
    text = record["text"]
    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return packing.lm_example(self.tokenizer.encode(text, bos=True, eos=True))


@dataclasses.dataclass(frozen=True)
class _Component:
  """One record set of a mixture: its record indices in the split, shuffle salt and weight."""

  name: str
  indices: np.ndarray
  salt: int
  weight: float


def _known_term(term: str) -> bool:
  key, _, value = term.partition(":")
  return term in corpus.SECTIONS or (key in ("since", "until") and bool(value))


def _components(
  data_dir: str | os.PathLike, split: str, mixture: Mapping[str, float] | None, num_records: int
) -> list[_Component]:
  """The record sets ``mixture`` names (all records for ``None``), positive weights only.

  A component is a section name, date bounds or both (``corpus.component_indices``). Its shuffle
  salt keeps the orders the corpus has always had: in a mixture of bare section names a section
  is salted by its number in ``corpus.SECTIONS`` (adding a section leaves the others' order
  alone); in a mixture with date bounds, by its position in the sorted mixture.
  """
  if mixture is None:
    return [_Component("all", np.arange(num_records), 0, 1.0)]
  unknown = sorted({t for name in mixture for t in name.split() if not _known_term(t)})
  if unknown:
    raise ValueError(
      f"mixture names unknown sections {unknown}; known: {corpus.SECTIONS} "
      "(and since:DATE / until:DATE bounds)"
    )
  names = sorted(mixture)
  if not any(float(mixture[n]) > 0 for n in names):
    raise ValueError(f"mixture {dict(mixture)} has no positive weight")
  sections_only = all(n in corpus.SECTIONS for n in names)
  index = corpus.section_index(data_dir, split) if any(n in corpus.SECTIONS for n in names) else {}
  out = []
  for position, name in enumerate(names, 1):
    weight = float(mixture[name])
    if weight <= 0:
      continue
    if name in corpus.SECTIONS:
      indices = index.get(name, np.zeros(0, np.int64))
    else:
      indices = corpus.component_indices(data_dir, split, name)
    salt = 1 + corpus.SECTIONS.index(name) if sections_only else 97 * position
    out.append(_Component(name, np.asarray(indices, np.int64), salt, weight))
  empty = [c.name for c in out if len(c.indices) == 0]
  if empty:
    raise ValueError(
      f"split {split!r} has no records of mixture component(s) {empty} under {data_dir}"
    )
  return out


def make_lm_dataset(
  data_dir: str | os.PathLike,
  split: str,
  tokenizer_path: str | os.PathLike,
  seq_len: int,
  batch_size: int,
  seed: int = 0,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  shards: int | None = None,
  mixture: Mapping[str, float] | None = None,
  num_epochs: int | None = None,
  shuffle: bool = True,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  drop_remainder: bool = True,
) -> grain.IterDataset:
  """Batches of packed token rows for language-model training or evaluation.

  Args:
    data_dir: the ``--output`` of ``astrollama_jax.commands.prepare`` (or the versioned folder).
    split: "train" or "validation".
    tokenizer_path: SentencePiece model (LLaMA-2's ``tokenizer.model``).
    seq_len: row length; rows hold [BOS] doc [EOS] [BOS] doc ... split at ``seq_len``.
    batch_size: rows per batch *on this host* (global batch / process_count).
    seed: shuffle seed; the same seed gives the same batches.
    mixture: weights of record sets, each a section name, date bounds or both
      (``corpus.component_indices``): ``{"abstract": 0.5, "introduction": 0.5}``, or
      ``{"since:2024-06-01": 0.7, "abstract until:2024-05-31": 0.3}`` (70% of the documents
      from everything since June 2024). Each set repeats independently. ``None``: all records
      as one stream.
    num_epochs: passes over the data; ``None`` repeats for ever (training). With a mixture
      the stream ends when the first record set runs out.
    shuffle: shuffle records (per epoch); turn off for evaluation.
    process_index, process_count, shards, worker_count, worker_buffer_size, drop_remainder:
      the layout and reading of the batches, see ``batches.packed_batches``.

  Returns:
    ``grain.IterDataset`` of dicts ``tokens``, ``targets``, ``segment_ids``, ``positions``
    (int32) and ``loss_mask`` (float32), each ``[batch_size, seq_len]``. Its iterator has
    ``get_state()``/``set_state()`` for checkpointing (``{"shards": {j: state}}``).
  """
  source = corpus.TextSource(data_dir, split)
  tokenize = _Tokenize(Tokenizer(tokenizer_path))
  components = _components(data_dir, split, mixture, len(source))

  def examples(j: int, count: int) -> grain.MapDataset:
    streams = []
    for c in components:
      records = _Subset(source, c.indices[j::count])
      if len(records) == 0:
        what = "" if mixture is None else f" of mixture component {c.name!r}"
        raise ValueError(
          f"data shard {j} of {count} gets no records{what} of split {split!r} under {data_dir}"
          + (": lower data.shards" if count > 1 else "")
        )
      epochs = _EpochShuffled(records, seed * 1000003 + c.salt, num_epochs, shuffle)
      streams.append(grain.MapDataset.source(epochs).map(tokenize))
    if len(streams) == 1:
      return streams[0]
    return grain.MapDataset.mix(streams, [c.weight for c in components])

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
  )


def count_tokens(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(non-padding tokens, all slots) of a batch: packing efficiency = first / second."""
  seg = np.asarray(batch["segment_ids"])
  return int((seg > 0).sum()), int(seg.size)
