"""A full disk is bad input like any other: one clear error naming the path and the free space.

Libraries report ENOSPC in their own ways: Python raises ``OSError(errno.ENOSPC)``, tensorstore
(Orbax's array writer) a ``ValueError`` whose text carries the OS message, riegeli (ArrayRecord)
a ``RuntimeError`` with the same text. ``disk_full_errors`` turns any of them into one
``DiskFullError`` that says which output could not be written and how much space is left, so
every writing command (convert, export, prepare, train) fails the same readable way.
``check_free_space`` refuses up front when a command knows how many bytes it will write;
``atomic_directory`` makes an output folder appear whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import os
import shutil
import time

from absl import logging

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = tuple(os.strerror(e) for e in _NO_SPACE)  # "No space left on device", ...


class DiskFullError(OSError):
  """A write failed (or would fail) for lack of disk space; ``str()`` names the path."""

  def __init__(self, message: str, path: str = ""):
    super().__init__(message)
    self.errno = errno.ENOSPC
    self.path = path


def is_disk_full(error: BaseException | None) -> bool:
  """Whether ``error`` or anything in its cause/context chain is a full disk (or quota)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFullError):
      return True
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
      return True
    if any(t in str(error) for t in _NO_SPACE_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_bytes(path: str) -> int | None:
  """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
  p = os.path.abspath(path)
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  try:
    return shutil.disk_usage(p).free
  except OSError:
    return None


def _size(n: int | None) -> str:
  if n is None:
    return "unknown"
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError


def disk_full_error(path: str, what: str, hint: str = "") -> DiskFullError:
  path = os.path.abspath(path)
  return DiskFullError(
    f"disk full: cannot write {what} {path}: no space left on the device "
    f"({_size(free_bytes(path))} free there){'; ' + hint if hint else ''}",
    path,
  )


@contextlib.contextmanager
def disk_full_errors(path: str, what: str, hint: str = "") -> Iterator[None]:
  """Re-raise a full-disk error from the block as ``DiskFullError`` naming ``what`` ``path``.

  Other errors pass through unchanged; a ``DiskFullError`` raised inside (already naming its
  path) is kept as it is.
  """
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:
    if is_disk_full(e):
      raise disk_full_error(path, what, hint) from e
    raise


def not_enough_space(
  path: str,
  need: int,
  what: str,
  free: int | None = None,
  hint: str = "free some space or choose another output",
) -> DiskFullError:
  path = os.path.abspath(path)
  free = free_bytes(path) if free is None else free
  return DiskFullError(
    f"disk full: {what} {path} needs {_size(need)} but only {_size(free)} is free there; {hint}",
    path,
  )


def check_free_space(path: str, need: int, what: str) -> None:
  """Refuse before writing ``need`` bytes of ``what`` at ``path`` if the disk cannot hold them.

  An unknown free space (``statvfs`` unsupported) lets the write go ahead.
  """
  free = free_bytes(path)
  if free is not None and free < need:
    raise not_enough_space(path, need, what, free)


def write_atomic(path: str, data: bytes | str) -> None:
  """Replace ``path`` with ``data`` via a temporary sibling: a failed write keeps the old file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(directory: str) -> Iterator[str]:
  """Yield a temporary sibling of ``directory``; rename it into place only on success.

  An interrupted or failed write leaves at most a hidden ``.<name>.partial`` folder (removed
  by the next attempt), never a folder under the final name that looks complete. The name is
  deterministic so that every process of a multi-host job agrees on it. A full disk anywhere
  in the block is reported as ``DiskFullError`` naming ``directory``.
  """
  import jax  # only writers of model files come here; the rest of this module needs no JAX

  final = os.path.abspath(directory)
  if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
    raise FileExistsError(f"output {final} exists and is not empty; choose another or remove it")
  tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial")
  primary = jax.process_index() == 0
  if primary:
    if os.path.exists(tmp):
      logging.warning("removing %s left by an interrupted write", tmp)
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  _sync("atomic_directory:start")
  try:
    with disk_full_errors(final, "the output folder"):
      yield tmp
      _sync("atomic_directory:written")
      if primary:
        if os.path.isdir(final):
          os.rmdir(final)  # empty, checked above
        os.rename(tmp, final)
      _sync("atomic_directory:renamed")
  except BaseException:
    if primary:
      _remove_settled(tmp)
    raise


def _remove_settled(folder: str, quiet_s: float = 0.5, limit_s: float = 5.0) -> None:
  """Remove ``folder``, again if it reappears, until it has stayed gone for ``quiet_s``.

  When one array write of an Orbax save fails, writes of its sibling arrays can still be in
  flight on Orbax's background threads; tensorstore recreates their parent folders, so a single
  ``rmtree`` can leave the partial folder behind.
  """
  end = time.monotonic() + limit_s
  gone_since = None
  while time.monotonic() < end:
    if os.path.exists(folder):
      shutil.rmtree(folder, ignore_errors=True)
      gone_since = None
    elif gone_since is None:
      gone_since = time.monotonic()
    elif time.monotonic() - gone_since >= quiet_s:
      return
    time.sleep(0.05)


def _sync(name: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
