"""Orbax checkpoints of a training run: params, optimizer state, step/RNG/counters, data iterator.

``WORKDIR/checkpoints/<step>/`` holds the items ``params`` and ``opt_state`` (StandardSave, each
process writing its own shards; ``checkpoints`` owns the names and reads ``params`` back for every
other command), ``train_meta`` (JSON: step, rng, skip counters, ...) and
``data_iter`` (one Grain iterator state file per process). Saves are asynchronous: the device
arrays are copied to host before ``save`` returns, the files are written in the background and
a step only becomes visible once finalised, so a crash mid-save leaves no half checkpoint that
looks complete. At start-up the newest step that restores cleanly wins; a corrupt one is reported,
moved to ``WORKDIR/checkpoints_corrupt/`` and the previous step is tried.

A full disk during a save stops the run with ``diskspace.DiskFullError`` naming the step folder
and the free space. The failed step was never finalised, so it is not a checkpoint; its temporary
folder is removed, and the earlier steps stay (Orbax deletes old steps only after a new one is
finalised), so the rerun resumes from the last complete one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from astrollama_jax import diskspace
from astrollama_jax.checkpoints import CHECKPOINTS_DIR, PARAMS_DIR
from astrollama_jax.train.state import TrainState

CORRUPT_DIR = "checkpoints_corrupt"


class _IteratorState:
  """Adapter between a Grain ``DatasetIterator`` and Grain's Orbax handler.

  The state is captured when the save is requested (not when a background thread gets to it),
  which is what an asynchronous save needs: the loop keeps consuming batches meanwhile.
  """

  def __init__(self, iterator: Any, capture: bool = True):
    self._it = iterator
    self._state = json.dumps(iterator.get_state()).encode() if capture else b""

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._it.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()


def _all_agree(ok: bool) -> bool:
  """True only if ``ok`` on every process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _replicated(value: Any, sharding: Any) -> jax.Array:
  """A small host value as a global array with the given (replicated) sharding, any process count."""
  x = np.asarray(value)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class Checkpointer:
  """An ``orbax.checkpoint.CheckpointManager`` over ``WORKDIR/checkpoints`` keeping ``keep`` steps."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS_DIR)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: int | None = None  # the step of the latest save started

  def check_free_space(self, nbytes: int) -> None:
    """Refuse to start when the disk cannot hold one more checkpoint of ``nbytes``.

    Better now than at the first save, after hours of steps; every process must agree, so that
    all stop together. Orbax deletes old steps only after a new one is finalised, so the space
    for one whole checkpoint must be free even when ``keep`` steps exist already.
    """
    free = diskspace.free_bytes(self.directory)
    if not _all_agree(free is None or free >= nbytes):
      raise diskspace.not_enough_space(
        self.directory,
        nbytes,
        "a checkpoint of this run in",
        hint="free some space or choose another --workdir",
      )

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iter: Any, meta: dict[str, Any]) -> bool:
    """Start saving ``state`` as ``step`` (returns at once when asynchronous)."""
    self.wait()  # a failure of the previous (background) save surfaces here, under its own step
    if step in self.manager.all_steps():
      return False
    meta = dict(
      meta,
      step=step,
      rng=[int(v) for v in np.asarray(jax.device_get(state.rng))],
      nonfinite_total=int(state.nonfinite_total),
      nonfinite_run=int(state.nonfinite_run),
      process_count=jax.process_count(),
      saved_at=time.time(),
    )
    args = ocp.args.Composite(
      **{
        PARAMS_DIR: ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "train_meta": ocp.args.JsonSave(meta),
        "data_iter": grain.checkpoint.CheckpointSave(_IteratorState(data_iter)),
      }
    )
    self._saving = step
    with self._disk_full_errors():
      return self.manager.save(step, args=args, force=True)

  @contextlib.contextmanager
  def _disk_full_errors(self):
    """A full disk while writing step ``self._saving``: drop its temporary folder, name it."""
    try:
      yield
    except Exception as e:
      if not diskspace.is_disk_full(e):
        raise
      step, self._saving = self._saving, None
      if jax.process_index() == 0:
        for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
          shutil.rmtree(tmp, ignore_errors=True)
      kept = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
      raise diskspace.disk_full_error(
        os.path.join(self.directory, str(step)),
        f"checkpoint step {step} to",
        f"complete checkpoints kept: {kept}; free some space and rerun the same command to resume "
        f"from step {kept[-1]}"
        if kept
        else "no complete checkpoint yet",
      ) from e

  def restore_latest(
    self, target: TrainState, data_iter: Any
  ) -> tuple[TrainState, dict[str, Any]] | None:
    """The newest step that restores cleanly, or None if there is none.

    ``target`` is a TrainState of ``jax.ShapeDtypeStruct``s carrying shardings: arrays come back
    straight onto the mesh. ``data_iter`` is set to the saved position.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            **{
              PARAMS_DIR: ocp.args.StandardRestore(target.params),
              "opt_state": ocp.args.StandardRestore(target.opt_state),
              "train_meta": ocp.args.JsonRestore(),
              "data_iter": grain.checkpoint.CheckpointRestore(
                _IteratorState(data_iter, capture=False)
              ),
            }
          ),
        )
        meta = dict(restored["train_meta"])
        if meta.get("step") != step:
          raise ValueError(f"train_meta says step {meta.get('step')}")
        ok, error = True, None
      except Exception as e:  # anything unreadable: report it, fall back to the previous step
        ok, error = False, e
      if not _all_agree(ok):
        logging.error(
          "checkpoint %s/%d cannot be restored (%s: %s); moving it to %s and trying the "
          "previous one",
          self.directory,
          step,
          type(error).__name__,
          error,
          CORRUPT_DIR,
        )
        self._quarantine(step)
        continue
      state = TrainState(
        step=_replicated(np.int32(step), target.step.sharding),
        params=restored[PARAMS_DIR],
        opt_state=restored["opt_state"],
        rng=_replicated(np.asarray(meta["rng"], np.uint32), target.rng.sharding),
        nonfinite_total=_replicated(
          np.int32(meta["nonfinite_total"]), target.nonfinite_total.sharding
        ),
        nonfinite_run=_replicated(np.int32(meta["nonfinite_run"]), target.nonfinite_run.sharding),
      )
      logging.info("resumed from %s/%d", self.directory, step)
      return state, meta
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      if os.path.exists(src):
        shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"quarantine {step}")
    self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-host preemption sync point (SIGTERM noticed by the distributed runtime)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    with self._disk_full_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
