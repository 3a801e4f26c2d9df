"""The state of a training run, saved and restored with its parameters: what a resume needs.

This is the run's state, not the model's: the optimizer state, the step, RNG and counters, and
the data position, plus how a restore that fails is classified. The model itself is the
``params`` item in our checkpoint format (``checkpoints``: its names, reader and loader), which
every other command reads without this module.

``WORKDIR/checkpoints/<step>/`` holds the items ``params`` and ``opt_state`` (StandardSave,
each process writing its own shards), ``train_meta`` (JSON: step, rng, skip counters, process
count, the run's ``identity``) and ``data_iter`` (one Grain iterator state file per process,
holding the states of the data shards it reads). Saves are asynchronous: the device arrays are
copied to host before ``save`` returns, the files are written in the background and a step only
becomes visible once finalised, so a crash mid-save leaves no half checkpoint that looks
complete.

At start-up the newest step is restored onto this run's mesh: parameters and optimizer state
are resharded by Orbax (any mesh, device or process count that can hold them). The data
position carries over to another process count: synthetic data's is global (every saving
process had the same state, the number of global batches read); lm and sft data keep one
state per virtual data shard (``data/shards.py``, fixed for the run by ``data.shards``), and a
process of the new count gathers the states of the shards it owns from the saved files. A
checkpoint whose run records no ``data.shards`` keeps a per-process state: it resumes only on
its own process count.

A failure is classified before anything is moved (every process agrees on the class, the most
serious one wins):

* incompatible (another model, optimizer layout, data source, shards or batch, a process or
  reader worker count the data position cannot follow, a data position this run's pipeline does
  not take, a ``train_meta`` without a key the restore needs): ``IncompatibleCheckpointError``
  before any array is read, one line naming what differs; nothing in the workdir is touched;
* transient (I/O errors, permission denied, timeouts): retried with exponential backoff, then
  ``TransientRestoreError``; the checkpoint stays where it is, for a rerun;
* corrupt or incomplete bytes (a file that is missing, cannot be decoded or reads back wrong):
  reported, moved to ``WORKDIR/checkpoints_corrupt/`` and the previous step is tried. If every
  step was corrupt the run stops (``NoUsableCheckpointError``) instead of silently starting
  again from step 0.

A full disk during a save stops the run with ``diskspace.DiskFullError`` naming the step folder
and the free space. The failed step was never finalised, so it is not a checkpoint; its temporary
folder is removed, and the earlier steps stay (Orbax deletes old steps only after a new one is
finalised), so the rerun resumes from the last complete one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import time
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from astrollama_jax.checkpoints import reader
from astrollama_jax.checkpoints.layout import CHECKPOINTS_DIR, PARAMS_DIR
from astrollama_jax.data.shards import fit_workers
from astrollama_jax.errors import UserError
from astrollama_jax.train import data_position, distributed, tree_diff
from astrollama_jax.train.state import TrainState
from astrollama_jax.util import diskspace

CORRUPT_DIR = "checkpoints_corrupt"
OPT_STATE_DIR = "opt_state"
DATA_ITER_DIR = "data_iter"

# Failure classes of a restore, in rising order of seriousness (processes agree on the maximum).
OK, CORRUPT, TRANSIENT, INCOMPATIBLE = 0, 1, 2, 3
# What ``train_meta`` must hold for a restore (besides the step it names).
_META_KEYS = ("rng", "nonfinite_total", "nonfinite_run")
_TRANSIENT_ERRNOS = frozenset(
  {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.EACCES,
    errno.EPERM,
    errno.ENOLCK,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ENETRESET,
    errno.ECONNABORTED,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.EREMOTEIO,
  }
)
# How tensorstore (whose errors reach us as ValueError text) words the same conditions.
_TRANSIENT_TEXT = (
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "PERMISSION_DENIED",
  "Permission denied",
  "Input/output error",
  "Resource temporarily unavailable",
  "Stale file handle",
  "Connection reset",
  "timed out",
)


RETRIES, RETRY_DELAY_S = 4, 2.0  # defaults of a transient read error's retries (2 + 4 + 8 + 16 s)


class RestoreError(UserError):
  """The workdir's checkpoints cannot be resumed from now; the message says why, in one line."""


class IncompatibleCheckpointError(RestoreError):
  """A checkpoint of another run layout: resuming it would be wrong, so nothing is touched."""


class TransientRestoreError(RestoreError):
  """Reading a checkpoint kept failing with I/O errors; it stays in place for a rerun."""


class NoUsableCheckpointError(RestoreError):
  """Every checkpoint of the workdir was corrupt (all quarantined): no silent start from step 0."""


def is_transient(error: BaseException) -> bool:
  """Whether ``error`` (or what caused it) is an I/O condition that may pass on a retry.

  A missing file is not: inside a finalised step it means incomplete bytes.
  """
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (TimeoutError, ConnectionError)):
      return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
      return True
    if not isinstance(e, FileNotFoundError) and any(t in str(e) for t in _TRANSIENT_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def _worst(code: int) -> int:
  """The most serious failure class over all processes."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def _replicated(value: Any, sharding: Any) -> jax.Array:
  """A small host value as a global array with the given replicated sharding (any processes)."""
  x = np.asarray(value)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class Checkpointer:
  """An Orbax ``CheckpointManager`` over ``WORKDIR/checkpoints`` keeping ``keep`` steps."""

  def __init__(
    self,
    workdir: str,
    keep: int = 3,
    async_save: bool = True,
    identity: dict[str, Any] | None = None,
    retries: int | None = None,
    retry_delay_s: float | None = None,
  ):
    """``identity``: what a resumed run must share with the saving one (data source, batch...);
    saved in ``train_meta`` and compared on restore. A transient read error is retried
    ``retries`` times (default ``RETRIES``), waiting ``retry_delay_s`` (``RETRY_DELAY_S``) and
    doubling."""
    self.identity = json.loads(json.dumps(identity or {}))  # as it reads back from train_meta
    self.retries = RETRIES if retries is None else retries
    self.retry_delay_s = RETRY_DELAY_S if retry_delay_s is None else retry_delay_s
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
    self._position: Any = None  # the data position of the step being restored, fitted to this run
    self._fresh: Any = None  # this run's data iterator state before anything was read

  def check_free_space(self, nbytes: int) -> None:
    """Refuse to start when the disk cannot hold one more checkpoint of ``nbytes``.

    Better now than at the first save, after hours of steps; every process must agree, so that
    all stop together. Orbax deletes old steps only after a new one is finalised, so the space
    for one whole checkpoint must be free even when ``keep`` steps exist already.
    """
    free = diskspace.free_bytes(self.directory)
    if not distributed.on_every_process(free is None or free >= nbytes):
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
      run=self.identity,
    )
    args = ocp.args.Composite(
      **{
        PARAMS_DIR: ocp.args.StandardSave(state.params),
        OPT_STATE_DIR: ocp.args.StandardSave(state.opt_state),
        "train_meta": ocp.args.JsonSave(meta),
        DATA_ITER_DIR: grain.checkpoint.CheckpointSave(data_position.IteratorState(data_iter)),
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
    """The newest step that restores, or None if the workdir has no checkpoint.

    ``target`` is a TrainState of ``jax.ShapeDtypeStruct``s carrying shardings: arrays come back
    straight onto the mesh. ``data_iter`` is set to the saved position. Failures are classified
    as the module docstring says; only corrupt steps are moved away.
    """
    steps = self.all_steps()
    self._fresh = json.loads(json.dumps(data_iter.get_state())) if steps else None
    quarantined: list[str] = []
    for step in reversed(steps):
      code, result = self._restore_with_retries(step, target, data_iter)
      if code == CORRUPT:
        error = result
        logging.error(
          "checkpoint %s/%d cannot be restored (%s: %s); moving it to %s and trying the "
          "previous one",
          self.directory,
          step,
          type(error).__name__,
          error,
          CORRUPT_DIR,
        )
        quarantined.append(
          f"{step} ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
          if error is not None
          else str(step)
        )
        self._quarantine(step)
        continue
      restored, meta = result
      state = TrainState(
        step=_replicated(np.int32(step), target.step.sharding),
        params=restored[PARAMS_DIR],
        opt_state=restored[OPT_STATE_DIR],
        rng=_replicated(np.asarray(meta["rng"], np.uint32), target.rng.sharding),
        nonfinite_total=_replicated(
          np.int32(meta["nonfinite_total"]), target.nonfinite_total.sharding
        ),
        nonfinite_run=_replicated(np.int32(meta["nonfinite_run"]), target.nonfinite_run.sharding),
      )
      logging.info("resumed from %s/%d", self.directory, step)
      return state, meta
    if quarantined:
      raise NoUsableCheckpointError(
        f"no checkpoint in {self.directory} could be restored: {'; '.join(quarantined)}; all "
        f"were moved to {os.path.join(self.workdir, CORRUPT_DIR)}. Rerun to start again from "
        "step 0, or move a step back to investigate"
      )
    return None

  def _restore_with_retries(self, step: int, target: TrainState, data_iter: Any) -> tuple[int, Any]:
    """(OK, (restored, meta)) or (CORRUPT, error); raises for the classes that stop the run."""
    delay = self.retry_delay_s
    for attempt in range(self.retries + 1):
      code, result = self._try_restore(step, target, data_iter)
      code = _worst(code)
      if code == INCOMPATIBLE:
        raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} does not fit this run: "
          f"{result if isinstance(result, str) else 'another process found a difference'}; "
          "resume with the settings it was saved with, or use a fresh --workdir "
          "(nothing was changed)"
        )
      if code != TRANSIENT:
        return code, result
      logging.warning(
        "checkpoint %s/%d: transient read error (%s), attempt %d of %d; retrying in %.1f s",
        self.directory,
        step,
        result,
        attempt + 1,
        self.retries + 1,
        delay,
      )
      if attempt < self.retries:
        time.sleep(delay)
        delay *= 2
    raise TransientRestoreError(
      f"checkpoint {self.directory}/{step} could not be read after {self.retries + 1} attempts "
      f"(last error: {result}); it was left in place: check the storage and rerun"
    )

  def _try_restore(self, step: int, target: TrainState, data_iter: Any) -> tuple[int, Any]:
    """One attempt, on this process: a failure class and the restored items, or what failed.

    Only a failure to read the step's bytes is CORRUPT: what is read back whole but does not
    fit this run (the settings, the data position) is INCOMPATIBLE and moves nothing.
    """
    try:
      difference = self._incompatibility(step, target) or data_position.apply(
        data_iter, self._position
      )
      if difference:
        return INCOMPATIBLE, difference
      restored = self._restore_items(step, target, data_iter)
      meta = dict(restored["train_meta"])
      if meta.get("step") != step:
        raise ValueError(f"train_meta says step {meta.get('step')}")
      if hasattr(data_iter, "start_prefetch"):
        data_iter.start_prefetch()
      return OK, (restored, meta)
    except Exception as e:  # noqa: BLE001 - classified: nothing is moved for what a retry may cure
      if is_transient(e):
        return TRANSIENT, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      return CORRUPT, e

  def _incompatibility(self, step: int, target: TrainState) -> str | None:
    """What differs between step ``step`` and this run, from metadata alone (no array is read)."""
    meta = dict(
      self.manager.restore(step, args=ocp.args.Composite(train_meta=ocp.args.JsonRestore()))[
        "train_meta"
      ]
    )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
      return f"its train_meta has no {missing} (written by another version of the trainer?)"
    saved_run = meta.get("run")
    if saved_run is not None:
      # a key one side lacks is no difference
      for key in sorted(set(saved_run) & set(self.identity)):
        if saved_run[key] != self.identity[key]:
          return f"{key} is {saved_run[key]!r} in the checkpoint, {self.identity[key]!r} now"
    self._position = None
    saved_procs = meta.get("process_count", jax.process_count())
    shards = self.identity.get("data.shards")
    if shards is not None and (saved_run is None or "data.shards" not in saved_run):
      if (shards, jax.process_count()) != (saved_procs, saved_procs):
        return (
          f"its data position is per process (its run records no data.shards): it resumes only on "
          f"{saved_procs} processes with --config.data.shards={saved_procs}"
        )
    position = data_position.read(
      os.path.join(self.directory, str(step), DATA_ITER_DIR), saved_procs
    )
    if position is None:
      return (
        f"it was saved by {saved_procs} processes and this run has "
        f"{jax.process_count()}, and its data position is per process "
        f"(data.kind {self.identity.get('data.kind')!r}): it can only resume on "
        f"{saved_procs} processes"
      )
    try:
      self._position = fit_workers(position, self._fresh)
    except ValueError as e:
      return str(e)
    step_dir = os.path.join(self.directory, str(step))
    for item, want in ((PARAMS_DIR, target.params), (OPT_STATE_DIR, target.opt_state)):
      stored = reader.stored_metadata(os.path.join(step_dir, item))
      diff = tree_diff.tree_difference(stored, want)
      if diff:
        what = (
          "the model's parameters differ"
          if item == PARAMS_DIR
          else "the optimizer state layout differs"
        )
        return f"{what}: {diff}"
    return None

  def _global_position(self, step: int, saved_procs: int) -> str | None:
    """``data_position.regathered`` for step ``step``."""
    return data_position.regathered(
      os.path.join(self.directory, str(step), DATA_ITER_DIR), saved_procs
    )

  def _restore_items(self, step: int, target: TrainState, data_iter: Any) -> dict[str, Any]:
    """Every array item of ``step`` onto ``target``'s shardings (Orbax reshards to this mesh) and
    ``train_meta``; the data position is already in ``data_iter`` (``data_position.apply``)."""
    items = {
      PARAMS_DIR: ocp.args.StandardRestore(target.params),
      OPT_STATE_DIR: ocp.args.StandardRestore(target.opt_state),
      "train_meta": ocp.args.JsonRestore(),
    }
    return self.manager.restore(step, args=ocp.args.Composite(**items))

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
