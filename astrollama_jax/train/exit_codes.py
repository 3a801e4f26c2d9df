"""The trainer's exit statuses: what a launcher or scheduler should do when a run ends.

======  ==========================================================================================
status  meaning and what the launchers (``launch/``) do
======  ==========================================================================================
0       the run reached its last step
1       a problem to fix (bad config, missing file, full disk): one ``error: ...`` line
3       too many non-finite steps in a row (``train.max_consecutive_nonfinite``)
73      the workdir is held by another live trainer (``.lock``): nothing was written
75      stopped on SIGTERM (preemption, the scheduler's time-limit signal) after saving a
        checkpoint of the step it stopped at, or at once while starting up (restore, compile:
        nothing new to save) (``EX_TEMPFAIL``): requeue, the rerun resumes
76      the hang watchdog fired (no step or checkpoint progress for ``train.hang_timeout_s``): all
        thread stacks are in the log; requeue, the rerun resumes from the last checkpoint
======  ==========================================================================================

Multi-process launchers exit with the highest status of their processes (as ``srun`` does), so
one hung process makes the job a 76 even if its peers stopped cleanly with 75.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FINISHED = 0
USER_ERROR = 1
NONFINITE = 3
WORKDIR_BUSY = 73  # EX_CANTCREAT
PREEMPTED = 75  # EX_TEMPFAIL
HUNG = 76

# Statuses after which rerunning the same command continues the run.
REQUEUE = (PREEMPTED, HUNG)


def for_summary(summary: Mapping[str, Any]) -> int:
  """The status of a run that returned ``summary``: ``PREEMPTED`` if a signal stopped it early."""
  return PREEMPTED if summary.get("preempted") else FINISHED
