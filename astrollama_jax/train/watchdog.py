"""The hang watchdog: no progress for ``train.hang_timeout_s`` -> every thread's stack, then exit.

A stuck data source, a collective waiting for a peer that is gone or a checkpoint write that
never finishes would otherwise hold the allocation until the scheduler's time limit, with
nothing in the log to say where. The training loop calls ``beat`` at every step and evaluation
batch; a background thread checks the time since the last beat and, past the timeout, writes
all thread stacks to stderr (``faulthandler``) and ends the process at once with
``exit_codes.HUNG`` (no cleanup that could hang too), which the launchers requeue: the rerun
resumes from the last complete checkpoint.

The watchdog is armed by the second beat, once the first step is done: restoring, compiling and
the first step (in a multi-process run it waits for the slowest process to finish compiling)
are not timed. The timeout must exceed the longest step, evaluation batch (including its first
compile) and checkpoint wait. 0 turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import faulthandler
import os
import sys
import threading
import time

from absl import logging

from astrollama_jax.train import exit_codes


class Watchdog:
  """Calls ``on_hang(message)`` once when ``beat`` has not been called for ``timeout_s``."""

  def __init__(
    self,
    timeout_s: float,
    on_hang: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
  ):
    if timeout_s <= 0:
      raise ValueError(f"hang timeout {timeout_s} must be positive (0 turns the watchdog off)")
    self.timeout_s, self.on_hang, self.clock = timeout_s, on_hang or dump_and_exit, clock
    self._last: float | None = None
    self._beats = 0  # armed from the second beat
    self._what = ""
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.fired = False

  def beat(self, what: str) -> None:
    """Progress: ``what`` (e.g. 'step 12') just finished or started."""
    self._last, self._what = self.clock(), what
    self._beats += 1

  def check(self) -> bool:
    """Fire if the last beat is older than the timeout; True if it has fired."""
    if not self.fired and self._beats >= 2:
      idle = self.clock() - self._last
      if idle > self.timeout_s:
        self.fired = True
        self.on_hang(
          f"no progress for {idle:.0f} s since {self._what} (hang timeout {self.timeout_s:g} s)"
        )
    return self.fired

  def start(self) -> Watchdog:
    interval = min(1.0, self.timeout_s / 4)

    def run():
      while not self._stop.wait(interval) and not self.check():
        pass

    self._thread = threading.Thread(target=run, name="hang-watchdog", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


def dump_and_exit(message: str) -> None:
  """Log ``message`` and every thread's stack, then end the process with ``exit_codes.HUNG``."""
  logging.error(
    "%s: dumping every thread's stack and exiting with status %d", message, exit_codes.HUNG
  )
  sys.stderr.flush()
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  os._exit(exit_codes.HUNG)  # no atexit handlers: they may wait on the very thing that hangs


_current: Watchdog | None = None


def beat(what: str) -> None:
  """Tell the running watchdog (if any) that the trainer made progress."""
  if _current is not None:
    _current.beat(what)


@contextlib.contextmanager
def watching(timeout_s: float) -> Iterator[Watchdog | None]:
  """Run a watchdog over the block (``timeout_s`` <= 0: none)."""
  global _current
  if not timeout_s or timeout_s <= 0:
    yield None
    return
  dog = _current = Watchdog(float(timeout_s)).start()
  logging.info(
    "hang watchdog: %g s without a step, evaluation batch or checkpoint ends the run", timeout_s
  )
  try:
    yield dog
  finally:
    _current = None
    dog.stop()
