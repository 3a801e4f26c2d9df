"""The tail every tokenized data kind shares: a shard's examples -> packed rows -> batches.

A kind (``pipeline.make_lm_dataset``: corpus records, ``chat_dataset.make_sft_dataset``:
conversations) says only how data shard ``j`` of ``S`` makes its examples, as a random-access
``grain.MapDataset`` of dicts of 1-D ``tokens``, ``targets`` and ``loss_mask`` (``packing.py``),
including its own shuffle and epochs. ``packed_batches`` does the rest the same way for all of
them, so the batch layout, the read-ahead and the checkpointable state cannot drift apart:

  layout (``shards.local_layout``: this process's shards, rows per shard batch)
  -> per owned shard: examples -> to_iter_dataset (``packing.read_options``) -> pack -> batch
  -> this process's shards side by side (``shards.sharded``) -> ``mp_prefetch`` workers
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import grain

from astrollama_jax.data import packing
from astrollama_jax.data import shards as shards_lib


def packed_batches(
  examples: Callable[[int, int], grain.MapDataset],
  *,
  seq_len: int,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  shards: int | None = None,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  drop_remainder: bool = True,
  method: Literal["concat_then_split", "first_fit"] = "concat_then_split",
  num_packing_bins: int = 16,
  packing_seed: int = 0,
) -> grain.IterDataset:
  """This process's batches of packed rows, built from ``examples(j, S)`` for each owned shard.

  Args:
    examples: ``(shard j, shards S) -> MapDataset`` of shard ``j``'s examples, in order.
    seq_len: row length.
    batch_size: rows per batch on this host (global batch / process_count).
    process_index, process_count: this host's place; default ``jax.process_index()`` /
      ``jax.process_count()``.
    shards: data shards over all hosts (``shards.py``; a multiple of ``process_count`` that
      divides the global batch); this host reads its ``shards / process_count`` of them, each
      packed and batched on its own. ``None``: one shard per host. The global batches depend
      on ``shards``, not on the process count.
    worker_count: Grain worker processes for reading, tokenizing and packing (0 = none). The
      batches depend on it (each worker packs its own slice) but are deterministic for a given
      value. Workers need absl flags parsed (run under ``absl.app.run``).
    worker_buffer_size: batches each worker keeps ready.
    drop_remainder: drop a last partial batch (finite epochs only).
    method, num_packing_bins, packing_seed: ``packing.pack_examples``'s packing.

  Returns:
    ``grain.IterDataset`` of dicts ``packing.BATCH_SPEC``, each ``[batch_size, seq_len]``; its
    iterator has ``get_state()``/``set_state()`` (``{"shards": {j: state}}``).
  """
  mine, rows, count = shards_lib.local_layout(batch_size, process_index, process_count, shards)
  read = packing.read_options(worker_count, streams=len(mine))

  def shard(j: int) -> grain.IterDataset:
    it = packing.pack_examples(
      examples(j, count).to_iter_dataset(read),
      seq_len,
      method=method,
      num_packing_bins=num_packing_bins,
      seed=packing_seed,
    )
    return it.batch(rows, drop_remainder=drop_remainder)

  return shards_lib.sharded(shard, mine, worker_count, worker_buffer_size)
