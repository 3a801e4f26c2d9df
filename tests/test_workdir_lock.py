"""One trainer per workdir: a second is refused, naming the holder; a dead holder's lock is taken"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from helpers import REPO
from helpers_train import SYNTHETIC, finish, records, start, tail, train_cmd
import pytest

from astrollama_jax.train import exit_codes
from astrollama_jax.train.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

HOLD = (
  "import sys, time\n"
  "from astrollama_jax.train.workdir_lock import WorkdirLock\n"
  "WorkdirLock(sys.argv[1]).acquire()\n"
  "print('locked', flush=True)\n"
  "time.sleep(600)\n"
)


def _holder(workdir) -> subprocess.Popen:
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_live_holder_blocks_and_a_killed_one_is_taken_over(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(WorkdirBusy) as busy:
      WorkdirLock(str(tmp_path)).acquire()
    assert busy.value.holder["pid"] == holder.pid
    assert busy.value.holder["host"] == socket.gethostname()
    assert f"pid {holder.pid}" in str(busy.value)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  # The kernel dropped the flock with the process; its record is still there: stale, replaced.
  lock = WorkdirLock(str(tmp_path)).acquire()
  assert lock.stale["pid"] == holder.pid
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
  with pytest.raises(WorkdirBusy):  # another descriptor, even in this process, is refused
    WorkdirLock(str(tmp_path)).acquire()
  lock.release()
  assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean exit leaves no stale record
  again = WorkdirLock(str(tmp_path)).acquire()
  assert again.stale is None
  again.release()


def test_a_leftover_record_without_a_lock_is_stale(tmp_path):
  (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 12345, "started": "then"}))
  lock = WorkdirLock(str(tmp_path / "")).acquire()
  assert lock.stale == {"host": "gone", "pid": 12345, "started": "then"}
  lock.release()


def _wait(cond, proc, log, timeout=240.0):
  end = time.time() + timeout
  while not cond():
    assert proc.poll() is None, f"the holder ended (rc {proc.returncode}):\n{tail(log)}"
    assert time.time() < end, f"timed out; log tail:\n{tail(log)}"
    time.sleep(0.1)


def _checkpoints(workdir) -> list[int]:
  folder = workdir / "checkpoints"
  return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


def _refused(proc, log, holder_pid: int) -> None:
  rc = proc.wait(timeout=180)
  text = tail(log)
  assert rc == exit_codes.WORKDIR_BUSY, text
  lines = [line for line in text.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, text
  assert f"pid {holder_pid}," in lines[0] and "in use by another trainer" in lines[0], text


def test_two_trainers_on_one_workdir_then_kill9_and_take_over(tmp_path):
  workdir = tmp_path / "run"
  run = [*SYNTHETIC, "--config.train.num_steps=100000"]
  first = start(train_cmd(workdir, *run), 1, tmp_path / "first.log")
  procs = [first]
  try:
    time.sleep(0.5)  # both start up together: the lock, not the timing, decides
    early = start(train_cmd(workdir, *run), 1, tmp_path / "early.log")
    procs.append(early)
    _refused(early, tmp_path / "early.log", first.pid)
    _wait(lambda: bool(records(workdir, "train")), first, tmp_path / "first.log")
    late = start(train_cmd(workdir, *run), 1, tmp_path / "late.log")  # while the first one trains
    procs.append(late)
    _refused(late, tmp_path / "late.log", first.pid)
    _wait(  # a checkpoint on disk (keep=5 rotates early ones away) and steps past it
      lambda: (
        bool(_checkpoints(workdir)) and any(r["step"] >= 4 for r in records(workdir, "train"))
      ),
      first,
      tmp_path / "first.log",
    )
    steps = [r["step"] for r in records(workdir, "train")]
    assert steps == list(range(1, len(steps) + 1)), "every step computed and logged exactly once"

    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    killed_after = max(r["step"] for r in records(workdir, "train"))
    last = killed_after + 2
    summary = finish(
      start(
        train_cmd(workdir, *SYNTHETIC, f"--config.train.num_steps={last}"), 1, tmp_path / "next.log"
      ),
      tmp_path / "next.log",
    )
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert 3 <= summary["resumed_from"] <= killed_after and summary["final_step"] == last
  assert (
    f"taking over the stale lock of a trainer that is gone (host {socket.gethostname()}, "
    f"pid {first.pid}," in tail(tmp_path / "next.log", 200_000)
  )
  assert (workdir / LOCK_FILE).read_text() == ""
