"""Where a run's wall time went: productive step time and badput by cause, over every session.

A ``Ledger`` times named buckets (``with ledger.time("checkpoint_save"): ...``); a bucket timed
inside another is taken out of the outer one, so no second is counted twice. Each session (one
process's run in a workdir) keeps its own buckets; whatever no bucket timed is ``other``, so a
session's buckets always add up to its wall time. The books are ``WORKDIR/goodput.json``,
replaced atomically at every log interval, checkpoint and the end, so a restart continues them.

Steps done after the checkpoint a restart resumes from are done again: on resume their step
time moves from ``step`` (productive) to ``redone_steps`` (badput), in the sessions that spent
it. The ledger knows that time from the productive total it recorded at every checkpoint save.
A session killed outright loses only the time since its last write (at most one log interval).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import json
import os
import time
from typing import Any

from absl import logging

FILE = "goodput.json"
PRODUCTIVE = "step"
# Badput causes, in the order the report lists them; "other" is wall time no bucket timed.
BADPUT = (
  "startup",
  "compilation",
  "data_wait",
  "checkpoint_save",
  "redone_steps",
  "evaluation",
  "other",
)
BUCKETS = (PRODUCTIVE, *BADPUT)


class Ledger:
  """The workdir's goodput books; this process's session is the last one.

  ``started``: when this session began (the process's start, so imports count as start-up).
  ``enabled``: False on the processes that do not write the workdir's files (all but 0).
  ``clock``: seconds since the epoch (tests pass their own).
  """

  def __init__(
    self,
    workdir: str,
    started: float | None = None,
    enabled: bool = True,
    clock: Callable[[], float] = time.time,
  ):
    self.path = os.path.join(workdir, FILE)
    self.enabled = enabled
    self._clock = clock
    now = self._clock()
    self.books: dict[str, Any] = {"sessions": [], "checkpoints": {}, "last_step": 0}
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          self.books = json.load(f)
      except (OSError, ValueError) as e:  # bookkeeping only: never a reason to stop a run
        logging.warning("%s unreadable (%s): goodput books start again", self.path, e)
    self.session: dict[str, Any] = {
      "start": now if started is None else started,
      "end": now,
      "buckets": {name: 0.0 for name in BUCKETS if name != "other"},
    }
    self.books["sessions"].append(self.session)
    self._stack: list[float] = []  # per open bucket: time spent in the buckets nested in it

  @contextlib.contextmanager
  def time(self, name: str) -> Iterator[None]:
    """Add the time spent in the block to bucket ``name`` (less what nested buckets took)."""
    if name not in self.session["buckets"]:
      raise ValueError(f"unknown goodput bucket {name!r}; known: {', '.join(BUCKETS[:-1])}")
    t0 = self._clock()
    self._stack.append(0.0)
    try:
      yield
    finally:
      elapsed = self._clock() - t0
      nested = self._stack.pop()
      self.session["buckets"][name] += elapsed - nested
      if self._stack:
        self._stack[-1] += elapsed

  def add(self, name: str, seconds: float) -> None:
    """Count ``seconds`` spent outside any ``time`` block (e.g. before the ledger existed)."""
    self.session["buckets"][name] += seconds

  def resumed(self, step: int) -> None:
    """The run (re)starts from the checkpoint of ``step`` (0: none): the steps after it that
    earlier sessions did are done again."""
    last = int(self.books.get("last_step", 0))
    marks = self.books.setdefault("checkpoints", {})
    mark = 0.0 if step == 0 else marks.get(str(step))  # step 0: a kill before any checkpoint
    if last > step and mark is not None:
      moved = max(self.productive() - mark, 0.0)
      for session in reversed(self.books["sessions"][:-1]):  # the sessions that spent it
        take = min(moved, session["buckets"][PRODUCTIVE])
        session["buckets"][PRODUCTIVE] -= take
        session["buckets"]["redone_steps"] = session["buckets"].get("redone_steps", 0.0) + take
        moved -= take
        if moved <= 0:
          break
      self.books["redone_steps_count"] = self.books.get("redone_steps_count", 0) + last - step
    self.books["checkpoints"] = {k: v for k, v in marks.items() if int(k) <= step}
    self.books["last_step"] = step

  def stepped(self, step: int) -> None:
    """Steps up to ``step`` are done (called at log intervals, when their time is known)."""
    self.books["last_step"] = step

  def checkpointed(self, step: int, keep: int = 0) -> None:
    """A checkpoint of ``step`` was started: remember the productive time up to it."""
    marks = self.books.setdefault("checkpoints", {})
    marks[str(step)] = self.productive()
    self.books["last_step"] = step
    if keep > 0:  # only steps that may still be resumed from need their mark
      for k in sorted(marks, key=int)[: -(keep + 1)]:
        del marks[k]

  def productive(self) -> float:
    return sum(s["buckets"][PRODUCTIVE] for s in self.books["sessions"])

  def summary(self) -> dict[str, Any]:
    """Totals over every session: wall, productive and badput seconds, and the goodput ratio."""
    self.session["end"] = self._clock()
    totals = {name: 0.0 for name in BUCKETS}
    wall = 0.0
    for s in self.books["sessions"]:
      w = s["end"] - s["start"]
      wall += w
      for name in BUCKETS[:-1]:
        totals[name] += s["buckets"].get(name, 0.0)
      totals["other"] += w - sum(s["buckets"].values())
    return {
      "wall_s": round(wall, 3),
      "productive_s": round(totals[PRODUCTIVE], 3),
      "goodput": round(totals[PRODUCTIVE] / wall, 4) if wall > 0 else 0.0,
      "badput_s": {name: round(totals[name], 3) for name in BADPUT},
      "sessions": len(self.books["sessions"]),
      "redone_steps": self.books.get("redone_steps_count", 0),
    }

  def flush(self) -> None:
    """Write the books (atomically: a kill mid-write leaves the previous version)."""
    self.session["end"] = self._clock()
    if not self.enabled:
      return
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.books, f)
    os.replace(tmp, self.path)


def flat(summary: dict[str, Any]) -> dict[str, float]:
  """A ``Ledger.summary`` as flat numbers (``badput_<cause>_s``), for metrics.jsonl and W&B."""
  out = {k: v for k, v in summary.items() if k != "badput_s"}
  out.update({f"badput_{k}_s": v for k, v in summary["badput_s"].items()})
  return out
