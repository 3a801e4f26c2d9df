"""A checkpoint's data position: Grain's iterator state, one JSON file per saving process.

Saved as Grain's Orbax handler writes it (``IteratorState``, in ``data_iter/process_I-of-N.json``);
read back here rather than by that handler, so that a restore can tell a position this run cannot
take (another process count without data shards, another reader worker count that changes the
data order, a state the pipeline refuses) from bytes that are corrupt: the first is said in one
line and moves nothing, the second raises.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax

from astrollama_jax.data.shards import owned, regather, shard_ids


class IteratorState:
  """What Grain's Orbax handler saves of a ``DatasetIterator``: its state as JSON.

  The state is captured when the save is requested (not when a background thread gets to it),
  which is what an asynchronous save needs: the loop keeps consuming batches meanwhile.
  """

  def __init__(self, iterator: Any):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state


def _read(folder: str, process: int, count: int) -> Any:
  with open(os.path.join(folder, f"process_{process}-of-{count}.json")) as f:
    return json.loads(f.read())


def read(folder: str, saved_procs: int) -> Any:
  """This process's saved iterator state from ``folder``: its own file on the process count that
  saved it, else ``regathered`` (None: it cannot be). Bytes that do not decode raise."""
  if saved_procs != jax.process_count():
    position = regathered(folder, saved_procs)
    return None if position is None else json.loads(position)
  return _read(folder, jax.process_index(), saved_procs)


def regathered(folder: str, saved_procs: int) -> str | None:
  """This process's iterator state re-derived from those ``saved_procs`` processes saved, as
  JSON, or None if it depends on the process count.

  A position every saving process shared (synthetic data: the number of global batches read)
  carries over as it is; one kept per data shard (lm, sft: ``data/shards.py``) is regathered
  for the shards this process owns now. A per-process packing state without shards cannot.
  """
  states = [_read(folder, i, saved_procs) for i in range(saved_procs)]
  held = shard_ids(states[0])
  if held:
    held = set().union(*(shard_ids(s) for s in states))
    if held != set(range(len(held))) or len(held) % jax.process_count():
      return None
    mine = owned(jax.process_index(), jax.process_count(), len(held))
  else:
    mine = range(0)
  try:
    return json.dumps(regather(states, mine))
  except ValueError as e:
    logging.warning("data position of %s cannot be carried over: %s", folder, e)
    return None


def apply(data_iter: Any, position: Any) -> str | None:
  """Set ``position`` on ``data_iter``; what the pipeline refuses is returned, not raised: a
  state that was read back whole but does not fit this run is no corruption."""
  try:
    data_iter.set_state(position)
  except Exception as e:  # noqa: BLE001 - any refusal of the pipeline means the same
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"its data position does not fit this run's data pipeline ({type(e).__name__}: {text})"
  return None
