"""The hang watchdog: a stalled step or a dead peer ends the run with a stack dump, not a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from helpers import free_port
from helpers_train import SYNTHETIC, TINY_MODEL, records, start, tail, train_cmd
import pytest

from astrollama_jax.train import exit_codes
from astrollama_jax.train.watchdog import Watchdog


def test_fires_once_when_no_beat_comes_within_the_timeout():
  now, fired = [0.0], []
  dog = Watchdog(10, on_hang=fired.append, clock=lambda: now[0])
  now[0] = 1000.0
  assert not dog.check(), "not armed before the first beat (start-up is not timed)"
  dog.beat("step 2")
  now[0] += 100.0
  assert not dog.check(), "nor before the second (the first step waits for every process)"
  dog.beat("step 3")
  now[0] += 9.5
  assert not dog.check()
  dog.beat("step 4")
  now[0] += 9.5
  assert not dog.check(), "every beat restarts the clock"
  now[0] += 1.0
  assert dog.check()
  assert fired == ["no progress for 10 s since step 4 (hang timeout 10 s)"]
  now[0] += 100.0
  dog.check()
  assert len(fired) == 1
  with pytest.raises(ValueError, match="must be positive"):
    Watchdog(0)


def test_a_stalled_data_source_dumps_every_stack_and_exits_hung(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  proc = start(
    train_cmd(
      workdir,
      *SYNTHETIC,
      "--config.train.num_steps=50",
      "--config.data.synthetic.stall_after_steps=4",
      "--config.train.hang_timeout_s=5",
    ),
    1,
    log,
  )
  try:
    rc = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = tail(log, 200_000)
  assert rc == exit_codes.HUNG, text[-4000:]
  assert "no progress for" in text and "since step 4 (hang timeout 5 s)" in text
  assert "Thread 0x" in text and "most recent call first" in text  # faulthandler, all threads
  assert "in _run_steps" in text, "the main thread's stack shows where the loop waits"
  assert "astrollama_jax/train/data.py" in text, "and the stalled data source is on a stack"
  assert [r["step"] for r in records(workdir, "train")] == [1, 2, 3, 4]
  assert (workdir / "checkpoints" / "3").is_dir()  # what a requeued run resumes from


RUN2 = [
  *TINY_MODEL,
  "--config.model.vocab_size=1024",
  "--config.mesh=(2,1,1)",
  "--config.data.kind=synthetic",
  "--config.data.synthetic.num_rows=64",
  "--config.data.seq_len=32",
  "--config.train.global_batch_size=4",
  "--config.train.num_steps=100000",
  "--config.log.every=1",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=False",
  "--config.checkpoint.every=0",
  "--config.train.hang_timeout_s=5",
]


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_process_ends_the_other_within_a_bounded_time(tmp_path, monkeypatch, victim):
  monkeypatch.setenv("ASTROLLAMA_HEARTBEAT_TIMEOUT_S", "20")  # the trainers' JAX heartbeat timeout
  port = free_port()
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = [
    start(
      train_cmd(
        tmp_path / "run",
        *RUN2,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      1,
      logs[i],
    )
    for i in range(2)
  ]
  try:
    end = time.time() + 300
    while not any(r["step"] >= 3 for r in records(tmp_path / "run", "train")):
      assert all(p.poll() is None for p in procs) and time.time() < end, tail(logs[0])
      time.sleep(0.1)
    os.kill(procs[victim].pid, signal.SIGKILL)
    survivor = procs[1 - victim]
    try:  # bounded by the JAX heartbeat timeout (20 s) or the watchdog (5 s), whichever acts
      rc = survivor.wait(timeout=150)
    except subprocess.TimeoutExpired:
      raise AssertionError(
        f"the surviving process still runs; log:\n{tail(logs[1 - victim])}"
      ) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert rc != 0, tail(logs[1 - victim])
