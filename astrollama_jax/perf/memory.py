"""Peak memory from /proc: this process's own peak, or a process tree's, sampled while it runs.

Why not ``getrusage``: a child's ``ru_maxrss`` starts at its parent's peak (Linux carries the
high-water mark over fork and exec), so a command started by a large benchmark or test process
would report the parent's memory as its own. ``/proc/<pid>/status`` belongs to the process
image: ``VmHWM`` is this process's peak since it started, and ``TreeSampler`` sums ``VmRSS``
(and its anonymous and file-backed parts) over a process and its descendants at each sample.
Linux only; elsewhere the numbers are 0.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import threading

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def status(pid: int | str = "self") -> dict[str, int]:
  """``VmRSS``, ``RssAnon``, ``RssFile`` and ``VmHWM`` of one process in bytes ({} if it is
  gone)."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, rest = line.partition(":")
        if key in FIELDS or key == "VmHWM":
          out[key] = int(rest.split()[0]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return out


def own_peak_rss_bytes() -> int:
  """This process's peak resident memory since it started (``VmHWM``), for a command's summary."""
  return status("self").get("VmHWM", 0)


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of one process (0 if it is gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return 0.0


def process_tree(root: int) -> list[int]:
  """``root`` and all its descendants (parents read from every /proc/<pid>/stat)."""
  children: dict[int, list[int]] = {}
  try:
    names = os.listdir("/proc")
  except OSError:
    return [root]
  for d in names:
    if d.isdigit():
      try:
        with open(f"/proc/{d}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      children.setdefault(ppid, []).append(int(d))
  out, todo = [], [root]
  while todo:
    pid = todo.pop()
    out.append(pid)
    todo += children.get(pid, [])
  return out


class TreeSampler:
  """Samples a process tree every ``interval`` seconds in a thread, until ``stop``.

  ``peaks`` holds the largest sum over the tree of each of ``FIELDS`` seen at one sample;
  ``cpu`` the last CPU seconds seen per process (a process that exits keeps its last value);
  ``on_sample(self)``, if given, runs after every sample (e.g. to mark phases).
  """

  def __init__(
    self,
    pid: int,
    interval: float = 0.05,
    on_sample: Callable[[TreeSampler], None] | None = None,
  ):
    self.pid = pid
    self.interval = interval
    self.on_sample = on_sample
    self.peaks = {k: 0 for k in FIELDS}
    self.cpu: dict[int, float] = {}
    self.samples = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def sample(self) -> None:
    total = dict.fromkeys(FIELDS, 0)
    for pid in process_tree(self.pid):
      for k, v in status(pid).items():
        if k in total:
          total[k] += v
      self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_seconds(pid))
    for k in FIELDS:
      self.peaks[k] = max(self.peaks[k], total[k])
    self.samples += 1
    if self.on_sample:
      self.on_sample(self)

  def _run(self) -> None:
    while not self._stop.is_set():
      self.sample()
      self._stop.wait(self.interval)

  def start(self) -> TreeSampler:
    self._thread.start()
    return self

  def stop(self) -> TreeSampler:
    self._stop.set()
    self._thread.join()
    return self

  def __enter__(self) -> TreeSampler:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  @property
  def peak_rss_bytes(self) -> int:
    return self.peaks["VmRSS"]
