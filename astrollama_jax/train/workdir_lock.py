"""One trainer per workdir: an exclusive ``flock`` on ``WORKDIR/.lock`` and a holder record in it.

Two trainers on one workdir (a requeued job whose old allocation is still winding down, a second
``sbatch`` of the same command) would both write checkpoints and ``metrics.jsonl``. The lock is
taken before anything else is written; a second trainer exits at once with ``WORKDIR_BUSY`` and
one line naming the holder (host, pid, start time, Slurm job) from the record.

The kernel drops a ``flock`` when its holder dies, ``kill -9`` included, so a dead holder never
blocks a rerun: the lock is free and its record, still on disk (a clean exit empties it), is
reported as stale and replaced. On a filesystem without ``flock`` support the record alone
decides: a holder on this host whose pid is alive blocks, anything else is taken over with a
warning. Multi-process runs take the lock on process 0 only (the others learn the outcome).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from absl import logging

from astrollama_jax.train import exit_codes

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live trainer holds the workdir."""

  def __init__(self, workdir: str, holder: dict[str, Any] | None):
    self.workdir, self.holder = workdir, holder
    super().__init__(
      f"{workdir} is in use by another trainer ({describe(holder)}); stop it or "
      "use another --workdir"
    )


def describe(holder: dict[str, Any] | None) -> str:
  """``host H, pid P, started T[, Slurm job J]`` from a holder record."""
  if not holder:
    return "holder unknown"
  text = f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
  return text + (f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else "")


def _record() -> dict[str, Any]:
  now = time.time()
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    "started_unix": now,
    "slurm_job": os.environ.get("SLURM_JOB_ID"),
  }


def _read(fd: int, tries: int = 20) -> dict[str, Any] | None:
  """The record in ``fd`` (a holder writes it right after locking: retry an empty read briefly)."""
  for i in range(tries):
    raw = os.pread(fd, 1 << 16, 0)
    if raw.strip():
      try:
        return json.loads(raw)
      except json.JSONDecodeError:  # torn by a crash mid-write: a stale record
        return {"host": "?", "pid": "?", "started": "?", "torn": True}
    if i + 1 < tries:
      time.sleep(0.05)
  return None


def _alive_here(holder: dict[str, Any]) -> bool:
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """The lock of one workdir; ``acquire`` raises ``WorkdirBusy`` when a live trainer holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None
    self._made: str | None = None  # the top folder acquire created, if any
    self.stale: dict[str, Any] | None = None  # the dead holder's record this lock replaced

  def acquire(self) -> WorkdirLock:
    top = os.path.abspath(self.workdir)
    while not os.path.exists(os.path.dirname(top)):
      top = os.path.dirname(top)
    self._made = None if os.path.exists(top) else top
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirBusy(self.workdir, holder) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        os.close(fd)
        raise
      holder = _read(fd, tries=1)
      if holder and _alive_here(holder):
        os.close(fd)
        raise WorkdirBusy(self.workdir, holder) from None
      logging.warning(
        "%s: this filesystem cannot flock (%s); the holder record alone guards the workdir",
        self.path,
        e,
      )
    self.stale = _read(fd, tries=1)
    if self.stale:
      logging.warning(
        "%s: taking over the stale lock of a trainer that is gone (%s)",
        self.path,
        describe(self.stale),
      )
    data = json.dumps(_record()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Empty the record (a clean exit leaves no stale holder) and drop the lock. A workdir that
    the lock itself created and that holds nothing else (a run refused before it wrote
    anything) is removed again: a refused command leaves nothing behind."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      os.close(self._fd)  # closing the last descriptor releases the flock
      self._fd = None
    if self._made and os.listdir(self.workdir) == [LOCK_FILE]:
      os.remove(self.path)
      for folder in (self.workdir, *_parents_up_to(self.workdir, self._made)):
        try:
          os.rmdir(folder)
        except OSError:
          break


def _parents_up_to(path: str, top: str) -> list[str]:
  """The folders above ``path`` up to and including ``top``."""
  out, path, top = [], os.path.abspath(path), os.path.abspath(top)
  while path != top and os.path.dirname(path) != path:
    path = os.path.dirname(path)
    out.append(path)
  return out


@contextlib.contextmanager
def held(workdir: str) -> Iterator[WorkdirLock | None]:
  """Hold ``workdir``'s lock for the block (process 0); a busy workdir ends every process with
  ``exit_codes.WORKDIR_BUSY`` and one ``error:`` line naming the holder."""
  import jax

  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirBusy as e:
      error = str(e)
  from astrollama_jax.train import distributed

  if not distributed.on_every_process(error is None):
    sys.stdout.flush()
    sys.stderr.write(f"error: {error or f'process 0 could not lock {workdir} (see its log)'}\n")
    sys.stderr.flush()
    os._exit(exit_codes.WORKDIR_BUSY)  # at once: nothing was written, there is nothing to clean up
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
