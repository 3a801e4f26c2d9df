"""The continual pre-training input pipeline: ArrayRecord corpus -> Grain -> packed batches.

    ds = make_lm_dataset(data_dir, "train", tokenizer_path, seq_len=2048, batch_size=8, seed=0)
    it = iter(ds)
    batch = next(it)            # dict of [batch_size, seq_len] arrays, see packing.py
    state = it.get_state()      # save with the checkpoint ...
    it.set_state(state)         # ... and the next batches are those of an uninterrupted run

Order of operations, and why:
  source (the split's ArrayRecord shards, random access, the text field only: corpus.TextSource)
  -> per section (for mixing): the record indices of that section (``section_index.npz``)
  -> per data shard ``j`` of ``S`` (``shards.py``): records ``ds[j::S]``; shards are fixed for
     the run, independent of the process count, disjoint and together the whole split
  -> repeat(num_epochs) with a seeded shuffle per epoch (``_EpochShuffled``)
  -> tokenize (SentencePiece; ``[BOS] + ids + [EOS]``) into next-token examples
  -> mix sections by weight (``MapDataset.mix``; still random access, so cheap to checkpoint)
  -> to_iter_dataset (read-ahead: ``packing.read_options``) -> pack (``packing.pack_examples``)
  -> batch of global_batch / S rows
  -> this process's shards side by side (``shards.ShardedBatches``) -> ``mp_prefetch`` workers
Everything before packing is index-based; packing and batching are Grain iterators with
checkpointable state (one per shard, so a checkpoint resumes on another process count), and
``mp_prefetch`` checkpoints its workers' states too.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import sys

import grain
import numpy as np

from astrollama_jax.data import packing
from astrollama_jax.data import shards as shards_lib
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


def _normalise_mixture(
  mixture: Mapping[str, float] | None, index: Mapping[str, np.ndarray], split: str
) -> dict[str, float] | None:
  if mixture is None:
    return None
  unknown = sorted(set(mixture) - set(corpus.SECTIONS))
  if unknown:
    raise ValueError(f"mixture names unknown sections {unknown}; known: {corpus.SECTIONS}")
  weights = {k: float(v) for k, v in mixture.items() if v > 0}
  if not weights:
    raise ValueError(f"mixture {dict(mixture)} has no positive weight")
  empty = [k for k in weights if len(index.get(k, ())) == 0]
  if empty:
    raise ValueError(f"split {split!r} has no records of section(s) {empty} named in the mixture")
  return weights


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
    process_index, process_count: this host's place; default ``jax.process_index()`` /
      ``jax.process_count()``.
    shards: data shards over all hosts (``shards.py``; a multiple of ``process_count`` that
      divides the global batch); this host reads its ``shards / process_count`` of them, each
      packed and batched on its own. ``None``: one shard per host. The global batches depend
      on ``shards``, not on the process count.
    mixture: e.g. ``{"abstract": 0.5, "introduction": 0.25, "conclusion": 0.25}``: sample
      sections with these weights (each section repeats independently). ``None``: all
      records as one stream.
    num_epochs: passes over the data; ``None`` repeats for ever (training). With a mixture
      the stream ends when the first section runs out.
    shuffle: shuffle records (per epoch); turn off for evaluation.
    worker_count: Grain worker processes for reading + tokenizing + packing (0 = none).
      The batches depend on ``worker_count`` (each worker packs its own slice) but are
      deterministic for a given value. Workers need absl flags parsed (run under
      ``absl.app.run``).
    worker_buffer_size: batches each worker keeps ready.
    drop_remainder: drop a last partial batch (finite epochs only).

  Returns:
    ``grain.IterDataset`` of dicts ``tokens``, ``targets``, ``segment_ids``, ``positions``
    (int32) and ``loss_mask`` (float32), each ``[batch_size, seq_len]``. Its iterator has
    ``get_state()``/``set_state()`` for checkpointing (``{"shards": {j: state}}``).
  """
  mine, rows, count = shards_lib.local_layout(batch_size, process_index, process_count, shards)
  read = packing.read_options(worker_count, streams=len(mine))
  source = corpus.TextSource(data_dir, split)
  tokenize = _Tokenize(Tokenizer(tokenizer_path))
  index = corpus.section_index(data_dir, split) if mixture is not None else {}
  weights = _normalise_mixture(mixture, index, split)

  def shard(j: int) -> grain.IterDataset:
    def component(indices: np.ndarray | None, salt: int) -> grain.MapDataset:
      if indices is None:
        indices = np.arange(len(source))
      records = _Subset(source, np.asarray(indices)[j::count])
      if len(records) == 0:
        raise ValueError(
          f"data shard {j} of {count} gets no records of split {split!r} under {data_dir}"
          + (": lower data.shards" if count > 1 else "")
        )
      epochs = _EpochShuffled(records, seed * 1000003 + salt, num_epochs, shuffle)
      return grain.MapDataset.source(epochs).map(tokenize)

    if weights is None:
      ds = component(None, 0)
    else:
      names = sorted(weights)
      ds = grain.MapDataset.mix(
        [component(index[n], 1 + corpus.SECTIONS.index(n)) for n in names],
        [weights[n] for n in names],
      )
    it = packing.pack_examples(ds.to_iter_dataset(read), seq_len)
    return it.batch(rows, drop_remainder=drop_remainder)

  return shards_lib.sharded(shard, mine, worker_count, worker_buffer_size)


def count_tokens(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(non-padding tokens, all slots) of a batch: packing efficiency = first / second."""
  seg = np.asarray(batch["segment_ids"])
  return int((seg > 0).sum()), int(seg.size)
