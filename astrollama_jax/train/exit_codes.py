"""The trainer's exit statuses and what a launcher or scheduler should do with each: the one table.

``python -m astrollama_jax.train.exit_codes`` prints the table; ``... exit_codes requeue`` prints
the statuses after which rerunning the same command continues the run (the SLURM batch script
reads them). Multi-process launchers exit with the highest status of their processes (as ``srun``
does), so one hung process makes the job a ``HUNG`` even if its peers stopped cleanly with
``PREEMPTED``; the statuses are ordered so that the highest is the one to act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import sys
from typing import Any

FINISHED = 0
USER_ERROR = 1  # every command's one ``error: ...`` line (commands/cli.py)
NONFINITE = 3
WORKDIR_BUSY = 73  # EX_CANTCREAT
PREEMPTED = 75  # EX_TEMPFAIL
HUNG = 76

# Statuses after which rerunning the same command continues the run.
REQUEUE = (PREEMPTED, HUNG)

# status -> (meaning, what the launchers in ``launch/`` do)
MEANINGS: dict[int, tuple[str, str]] = {
  FINISHED: ("reached the last step", "done"),
  USER_ERROR: (
    "a problem to fix (bad config, missing file, full disk): one `error: ...` line",
    "stop",
  ),
  NONFINITE: ("too many non-finite steps in a row (`train.max_consecutive_nonfinite`)", "stop"),
  WORKDIR_BUSY: (
    "the workdir is held by another live trainer (`WORKDIR/.lock` names its host, pid, start "
    "time): nothing was written",
    "stop",
  ),
  PREEMPTED: (
    "stopped on SIGTERM (preemption, the scheduler's time-limit signal) after saving a "
    "checkpoint of the step it stopped at, or at once while starting up (restore, compile: "
    "nothing new to save)",
    "requeue: the rerun resumes",
  ),
  HUNG: (
    "the hang watchdog fired: no step, evaluation batch or checkpoint progress for "
    "`train.hang_timeout_s` (all thread stacks are in the log)",
    "requeue: the rerun resumes from the last checkpoint",
  ),
}


def for_summary(summary: Mapping[str, Any]) -> int:
  """The status of a run that returned ``summary``: ``PREEMPTED`` if a signal stopped it early."""
  return PREEMPTED if summary.get("preempted") else FINISHED


def table() -> str:
  """The statuses as a markdown table: status, meaning, what the launchers do."""
  lines = ["| exit status | meaning | the launchers |", "|---|---|---|"]
  lines += [f"| {code} | {meaning} | {then} |" for code, (meaning, then) in MEANINGS.items()]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  """``requeue``: the requeue statuses, space-separated; no argument: the table."""
  if list(argv) == ["requeue"]:
    print(" ".join(str(code) for code in REQUEUE))
  elif not argv:
    print(table())
  else:
    print("usage: python -m astrollama_jax.train.exit_codes [requeue]", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
