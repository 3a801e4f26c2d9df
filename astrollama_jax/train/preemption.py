"""SIGTERM before the step loop: stop at once with the requeue status.

A scheduler's SIGTERM (preemption, the time limit) leaves a short grace period before SIGKILL.
During start-up (distributed set-up, restore, compile) there is nothing new to save, so the run
stops at once and exits ``exit_codes.PREEMPTED`` for the launcher to requeue it; without this the
signal's default action ends the process with 143, which no launcher requeues. Once the step
loop runs, its own handler (``loop._Preemption``) replaces this one and saves at the next step
boundary. Multi-process runs hand SIGTERM to JAX's preemption service once
``jax.distributed.initialize`` has run.

Kept free of JAX imports: the trainer installs it before anything slow.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import signal


class Preempted(BaseException):
  """SIGTERM outside the step loop. A ``BaseException``, so that no ``except Exception`` on the
  way (a restore's failure classification, for one) takes it for an error of its own."""


def _raise(signum, frame) -> None:
  raise Preempted(f"signal {signum} before the step loop")


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
  """Within the block SIGTERM raises ``Preempted`` (the step loop installs its own meanwhile)."""
  old = signal.signal(signal.SIGTERM, _raise)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)
