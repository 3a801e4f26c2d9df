"""Virtual data shards: a data order that does not depend on the number of processes.

A run splits its records into ``S`` shards, fixed for the run. Shard ``j`` is what one process
of ``S`` would read on its own: records ``[j::S]``, its own shuffle, tokenizer, packer and
batches of ``global_batch / S`` rows. Process ``p`` of ``P`` (``P`` divides ``S``) owns shards
``[p * S/P, (p + 1) * S/P)`` and feeds their batches one after the other (shard-major), so row
block ``j`` of the global batch at step ``k`` is shard ``j``'s ``k``-th batch for any ``P``.

The iterator's state maps each shard to its own Grain state (``{"shards": {"j": ...}}``). A
checkpoint saved by ``P`` processes holds ``P`` such states; ``regather`` re-derives the state
of a process of another count from them, exactly. ``fit_workers`` carries a state to another
number of reader worker processes where the data order allows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import numpy as np

SHARDS_KEY = "shards"


def check_layout(global_batch: int, shards: int, process_count: int) -> None:
  """One line naming the setting when ``shards`` cannot split the batch or the processes."""
  if shards < 1:
    raise ValueError(f"data.shards must be >= 1, got {shards}")
  if global_batch % shards:
    raise ValueError(
      f"data.shards {shards} does not divide the global batch of {global_batch} rows: "
      "choose a divisor (0: one shard per row)"
    )
  if shards % process_count:
    raise ValueError(
      f"{process_count} processes cannot share data.shards {shards} evenly: run on a process "
      f"count that divides {shards}, or start a run with other data.shards"
    )


def owned(process_index: int, process_count: int, shards: int) -> range:
  """The shards process ``process_index`` of ``process_count`` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if shards % process_count:
    raise ValueError(f"{process_count} processes cannot share {shards} data shards evenly")
  per = shards // process_count
  return range(process_index * per, (process_index + 1) * per)


def local_layout(
  batch_size: int, process_index: int | None, process_count: int | None, shards: int | None
) -> tuple[range, int, int]:
  """(this process's shards, rows per shard batch, shards in all) for a local batch of
  ``batch_size`` rows.

  ``shards=None``: one shard per process (the layout of a run without virtual shards).
  """
  if process_index is None or process_count is None:
    import jax  # only to find this host's place

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  shards = process_count if shards is None else shards
  check_layout(batch_size * process_count, shards, process_count)
  mine = owned(process_index, process_count, shards)
  return mine, batch_size * process_count // shards, shards


class ShardedBatches(grain.IterDataset):
  """This process's batches: the concatenation of its shards' batches, in shard order.

  An epoch (finite ``num_epochs``) ends when the first shard runs out, on every process at the
  same step (the shard streams do not depend on the process count). ``mp_prefetch`` over this
  dataset gives each worker every shard's slice, so a process runs ``worker_count`` workers
  whatever its number of shards.
  """

  def __init__(self, parts: Sequence[tuple[int, grain.IterDataset]]):
    super().__init__([ds for _, ds in parts])
    self._ids = [int(j) for j, _ in parts]

  def __iter__(self) -> grain.DatasetIterator:
    return _ShardedIterator(self._parents, self._ids)

  def __str__(self) -> str:
    return f"ShardedBatches(shards={self._ids})"


class _ShardedIterator(grain.DatasetIterator):
  def __init__(self, parents: Sequence[grain.IterDataset], ids: list[int]):
    super().__init__([p.__iter__() for p in parents])
    self._ids = ids

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._parents]
    if len(batches) == 1:
      return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {SHARDS_KEY: {str(j): it.get_state() for j, it in zip(self._ids, self._parents)}}

  def set_state(self, state: dict[str, Any]) -> None:
    states = state.get(SHARDS_KEY) if isinstance(state, dict) else None
    if states is None and len(self._ids) == 1:
      states = {str(self._ids[0]): state}  # a position saved before shards: one per process
    missing = [j for j in self._ids if str(j) not in (states or {})]
    if missing:
      raise ValueError(f"the data position has no state for shard(s) {missing}")
    for j, it in zip(self._ids, self._parents):
      it.set_state(states[str(j)])

  def __str__(self) -> str:
    return f"ShardedIterator(shards={self._ids})"


def sharded(
  build: Callable[[int], grain.IterDataset],
  mine: Iterable[int],
  worker_count: int = 0,
  worker_buffer_size: int = 2,
) -> grain.IterDataset:
  """``ShardedBatches`` of ``build(j)`` for each owned shard ``j``, prefetched by
  ``worker_count`` Grain worker processes of this process (0: none)."""
  ds = ShardedBatches([(j, build(j)) for j in mine])
  if worker_count > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
      )
    )
  return ds


def shard_ids(state: Any) -> set[int]:
  """Every shard a saved iterator state holds (nested anywhere, e.g. under prefetch workers)."""
  out: set[int] = set()
  if isinstance(state, dict):
    for k, v in state.items():
      if k == SHARDS_KEY and isinstance(v, dict):
        out |= {int(j) for j in v}
      else:
        out |= shard_ids(v)
  elif isinstance(state, list):
    for v in state:
      out |= shard_ids(v)
  return out


def regather(states: Sequence[Any], mine: Iterable[int]) -> Any:
  """The iterator state of a process owning shards ``mine``, from the states saved by every
  process of another count (each holding its own shards).

  Shard states are taken from whichever process held them; everything else (e.g. the prefetch
  workers' bookkeeping) must be the same in every saved state, since all processes consumed
  the same number of batches. Raises ``ValueError`` saying what cannot be re-derived.
  """
  mine = [int(j) for j in mine]

  def merge(values: list[Any], where: str) -> Any:
    first = values[0]
    if all(isinstance(v, dict) for v in values):
      keys = set(first)
      if any(set(v) != keys for v in values):
        raise ValueError(f"the saved data positions differ in their keys at {where or 'top'}")
      out = {}
      for k in first:
        if k == SHARDS_KEY and all(isinstance(v[k], dict) for v in values):
          held: dict[str, Any] = {}
          for v in values:
            held.update(v[k])
          missing = [j for j in mine if str(j) not in held]
          if missing:
            raise ValueError(f"no saved process held data shard(s) {missing}")
          out[k] = {str(j): held[str(j)] for j in mine}
        else:
          out[k] = merge([v[k] for v in values], f"{where}/{k}")
      return out
    if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
      return [merge([v[i] for v in values], f"{where}/{i}") for i in range(len(first))]
    if any(v != first for v in values):
      raise ValueError(f"the saved data positions are per process (they differ at {where})")
    return first

  if not shard_ids(states[0]):
    if any(s != states[0] for s in states):
      raise ValueError("the saved data positions are per process (no data shards)")
    return states[0]
  return merge(list(states), "")


# The keys of Grain's interleave state, which ``mp_prefetch`` wraps around its workers' states.
_WORKER_KEYS = ("iterators_in_use_states", "exhausted")


def reader_workers(state: Any) -> int:
  """The Grain reader worker processes (``mp_prefetch``) a saved iterator state is of (0: none)."""
  if isinstance(state, dict) and all(k in state for k in _WORKER_KEYS):
    return len(state["exhausted"])
  return 0


def fit_workers(saved: Any, fresh: Any) -> Any:
  """``saved`` (a data position) in the reader-worker layout of ``fresh`` (the state of this
  run's iterator before it read anything).

  No worker and one worker read the same stream (the one worker reads all of it), so a position
  moves between them: one worker's state is the stream's state, wrapped. With two or more
  workers each packs its own slice of the records: another worker count is another data order,
  refused with a ``ValueError`` that says so.
  """
  have, want = reader_workers(saved), reader_workers(fresh)
  if have == want:
    return saved
  if max(have, want) <= 1:
    if want == 1:
      return dict(fresh, iterators_in_use_states=[saved])
    inner = saved["iterators_in_use_states"][0]
    if inner is None or saved["exhausted"][0]:
      raise ValueError("its data position holds no state of its one reader worker's stream")
    return inner
  raise ValueError(
    f"its data position was saved with {have} data reader worker(s) (worker_count) and this run "
    f"has {want}: with {max(have, want)} workers each packs its own slice of the records, so "
    "the data order cannot be kept"
  )
