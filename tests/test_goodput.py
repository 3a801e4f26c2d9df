"""Goodput books (``train/goodput.py``) over a killed, resumed and preempted run, and the
optional W&B logging (``train/wandb_log.py``) read back from its offline files."""

from __future__ import annotations

import json
import os
import signal
import struct
import time

from helpers_train import SYNTHETIC, finish, records, start, tail, train_cmd
import pytest

from astrollama_jax.train import exit_codes, goodput


def test_ledger_nests_balances_and_moves_redone_time(tmp_path):
  clock = iter([0.0, 1.0, 2.0, 5.0, 6.0, 10.0, 11.0, 12.0]).__next__
  ledger = goodput.Ledger(str(tmp_path), started=0.0, clock=clock)
  with ledger.time("step"):  # 1 .. 6, of which 2 .. 5 in a save
    with ledger.time("checkpoint_save"):
      pass
  ledger.checkpointed(3)
  with ledger.time("step"):  # 10 .. 11
    pass
  ledger.stepped(5)
  books = ledger.summary()  # at 12
  assert books["productive_s"] == 3.0 and books["badput_s"]["checkpoint_save"] == 3.0
  assert books["badput_s"]["other"] == 6.0 and books["wall_s"] == 12.0
  with open(tmp_path / goodput.FILE, "w") as f:
    json.dump(ledger.books, f)

  again = goodput.Ledger(str(tmp_path), started=20.0, clock=lambda: 20.0)
  again.resumed(3)  # steps 4 and 5 (one second of step time) are done again
  books = again.summary()
  assert books["redone_steps"] == 2 and books["badput_s"]["redone_steps"] == 1.0
  assert books["productive_s"] == 2.0 and books["sessions"] == 2

  # killed before its first checkpoint: the restart from step 0 redoes every step
  first = goodput.Ledger(
    str(tmp_path / "b"), started=0.0, clock=iter([0.0, 1.0, 3.0, 4.0]).__next__
  )
  with first.time("step"):
    pass
  first.stepped(2)
  (tmp_path / "b").mkdir()
  first.flush()
  second = goodput.Ledger(str(tmp_path / "b"), started=9.0, clock=lambda: 9.0)
  second.resumed(0)
  books = second.summary()
  assert books["redone_steps"] == 2 and books["badput_s"]["redone_steps"] == 2.0
  assert books["productive_s"] == 0.0 and books["wall_s"] == 4.0
  with pytest.raises(ValueError, match="unknown goodput bucket 'stepp'"):
    with again.time("stepp"):
      pass


def _wait_step(workdir, proc, log, step):
  end = time.time() + 240
  while not any(r["step"] >= step for r in records(workdir, "train")):
    assert proc.poll() is None and time.time() < end, tail(log)
    time.sleep(0.05)


def test_books_balance_over_a_kill_a_resume_and_a_preemption(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  # 200 steps: test_train_cli's program, so the suite's compile cache serves it
  cmd = train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=200")
  walls = []

  t0 = time.time()  # session 1: killed outright after step 3's checkpoint and a few more steps
  proc = start(cmd, 1, log)
  try:
    end = time.time() + 240
    while not (workdir / "checkpoints" / "3").is_dir():
      assert proc.poll() is None and time.time() < end, tail(log)
      time.sleep(0.05)
    _wait_step(workdir, proc, log, 5)
    books = json.loads((workdir / goodput.FILE).read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  walls.append(time.time() - t0)
  done = json.loads((workdir / goodput.FILE).read_text())["last_step"]
  checkpoint = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert done > checkpoint >= 3 and books["last_step"] >= 5

  t0 = time.time()  # session 2: resumes (redoing steps), then SIGTERM: saves, exits 75
  proc = start(cmd, 1, log)
  try:
    _wait_step(workdir, proc, log, done + 2)
    proc.send_signal(signal.SIGTERM)
    summary = finish(proc, log, timeout=120, rc=exit_codes.PREEMPTED)
  finally:
    if proc.poll() is None:
      proc.kill()
  walls.append(time.time() - t0)

  assert summary["resumed_from"] == checkpoint and summary["preempted"]
  g = summary["goodput"]
  assert g["sessions"] == 2 and g["redone_steps"] == done - checkpoint
  assert g["badput_s"]["redone_steps"] > 0 and g["productive_s"] > 0
  assert g["badput_s"]["startup"] > 0 and g["badput_s"]["compilation"] > 0
  assert g["badput_s"]["checkpoint_save"] > 0 and g["badput_s"]["data_wait"] > 0
  parts = g["productive_s"] + sum(g["badput_s"].values())
  assert abs(parts - g["wall_s"]) < 0.01  # productive + badput is the wall time
  # ...and the wall time of both sessions as measured from outside: less only the killed
  # session's time after its last write (one step) and each process's exit
  assert sum(walls) - 10.0 < g["wall_s"] <= sum(walls) + 0.5, (g, walls)
  # each session's own books, from its process start to its last write
  sessions = json.loads((workdir / goodput.FILE).read_text())["sessions"]
  for s, wall in zip(sessions, walls, strict=True):
    assert wall - 10.0 < s["end"] - s["start"] <= wall + 0.5, (s, wall)
  last = records(workdir, "goodput")[-1]
  assert last["step"] == summary["final_step"] and last["wall_s"] == g["wall_s"]
  assert last["badput_redone_steps_s"] == g["badput_s"]["redone_steps"]


# --- W&B ------------------------------------------------------------------------------------


def _wandb_records(path):
  """The protobuf records of a ``.wandb`` file (LevelDB's log format: 32 KiB blocks of
  checksummed chunks, after a 7-byte header). wandb no longer ships a Python reader of it."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  pos, block, pending, out = 7, 32768, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
    pending += chunk
    if kind in (1, 4):  # full, last
      rec = wandb_internal_pb2.Record()
      rec.ParseFromString(pending)
      out.append(rec)
      pending = b""
    elif kind == 0 and length == 0:
      break
  return out


def test_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
  import sys

  from astrollama_jax.errors import UserError
  from astrollama_jax.train import wandb_log
  from astrollama_jax.train.defaults import base_config

  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
  config = base_config()
  config.log.wandb = True
  with pytest.raises(UserError, match=r"log.wandb=True needs the wandb package: pip install"):
    wandb_log.start(config.log, str(tmp_path), {})


def test_wandb_offline_run_continues_on_resume(tmp_path, monkeypatch):
  pytest.importorskip("wandb", reason="wandb (the optional [wandb] extra) is not installed")
  from astrollama_jax.train import wandb_log
  from astrollama_jax.train.defaults import base_config
  from astrollama_jax.train.metrics import MetricsLogger

  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  (tmp_path / "wandb_dir").mkdir()
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = base_config()
  config.log.wandb_project = "goodput-test"
  assert wandb_log.start(config.log, str(workdir), {}) is None  # off by default
  config.log.wandb = True

  losses = {1: 2.5, 2: 2.25, 3: 2.0, 4: 1.75}
  for steps in ((1, 2), (3, 4)):  # a run, then its resume
    run = wandb_log.start(config.log, str(workdir), {"seed": 7})
    logger = MetricsLogger(str(workdir), 4, steps[0] - 1, progress=False, wandb_run=run)
    for s in steps:
      logger.write(s, "train", {"loss": losses[s], "lr": 0.1})
    logger.write(steps[-1], "goodput", {"goodput": 0.5, "wall_s": 10.0})
    logger.close({"goodput": 0.5})

  run_id = (workdir / wandb_log.RUN_ID_FILE).read_text().strip()
  files = sorted((tmp_path / "wandb_dir").rglob("*.wandb"))
  assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
  history = {}
  for f in files:
    recs = _wandb_records(f)
    runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_id == run_id and runs[0].project == "goodput-test"
    assert runs[0].display_name == "run"
    for r in recs:
      if r.WhichOneof("record_type") == "history":
        items = {
          (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item
        }
        history[items["_step"]] = items
  assert {s: history[s]["train/loss"] for s in losses} == losses
  assert history[4]["goodput/goodput"] == 0.5 and history[2]["goodput/wall_s"] == 10.0
