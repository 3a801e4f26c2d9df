"""The train command end to end: preemption, corrupt checkpoints, bad configs."""

from __future__ import annotations

from helpers_train import SYNTHETIC, finish, records, start, tail, train_cmd

# --- tests ---------------------------------------------------------------------------------


def test_sigterm_saves_and_a_corrupt_latest_checkpoint_falls_back(tmp_path):
  import signal
  import time

  workdir, log = tmp_path / "run", tmp_path / "run.log"
  proc = start(train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=200"), 1, log)
  try:
    end = time.time() + 180
    while not any(r["step"] >= 4 for r in records(workdir, "train")):
      assert proc.poll() is None and time.time() < end, tail(log)
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    from astrollama_jax.train import exit_codes

    summary = finish(proc, log, timeout=120, rc=exit_codes.PREEMPTED)  # stopped early, saved
  finally:
    if proc.poll() is None:
      proc.kill()
  stopped = summary["final_step"]
  assert summary["preempted"] and 4 <= stopped < 200
  ckpt = workdir / "checkpoints"
  assert (ckpt / str(stopped)).is_dir(), (
    "preemption must leave a checkpoint of the step it stopped at"
  )
  assert any(r.get("event") == "preempted" for r in records(workdir, "event"))

  # Damage the newest checkpoint: the restart reports it, sets it aside, resumes from the last.
  for f in (ckpt / str(stopped) / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  previous = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and int(p.name) < stopped)
  summary = finish(
    start(train_cmd(workdir, *SYNTHETIC, f"--config.train.num_steps={stopped + 2}"), 1, log), log
  )
  assert summary["resumed_from"] == previous and summary["final_step"] == stopped + 2
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints_corrupt").iterdir()] == [
    str(stopped)
  ]
  assert f"checkpoints/{stopped} cannot be restored" in tail(log, 200_000)


# The train command with its restore held up (a 70B restore takes minutes): the test's SIGTERM
# lands in start-up, before any step.
_SLOW_RESTORE = """
import pathlib, sys, time
from astrollama_jax.train import run_state

marker = pathlib.Path(sys.argv[1])

def slow(self, *args):
  marker.touch()
  time.sleep(300)

run_state.Checkpointer.restore_latest = slow
from astrollama_jax.commands import start

start("train", ["astrollama_jax train", *sys.argv[2:]])
"""


def test_sigterm_while_starting_up_exits_for_a_requeue(tmp_path):
  import signal
  import sys
  import time

  from astrollama_jax.train import exit_codes

  workdir, log, marker = tmp_path / "run", tmp_path / "run.log", tmp_path / "restoring"
  flags = train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=3")[4:]
  proc = start([sys.executable, "-c", _SLOW_RESTORE, str(marker), *flags], 1, log)
  try:
    end = time.time() + 180
    while not marker.exists():
      assert proc.poll() is None and time.time() < end, tail(log)
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == exit_codes.PREEMPTED, tail(log)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = tail(log, 100_000)
  assert "SIGTERM while starting up" in text and "Traceback" not in text, text
  assert records(workdir, "train") == []


def test_config_errors_name_the_setting(tmp_path):
  import pytest

  from astrollama_jax.model.config import get_config
  from astrollama_jax.train import resolve
  from astrollama_jax.train.defaults import base_config

  config = base_config()
  config.data.kind = "synthetic"
  config.data.seq_len = 1024
  with pytest.raises(ValueError, match="seq_len 1024 exceeds the model's max_seq_len 512"):
    resolve.check_compatible(get_config("tiny"), config, None)
  config.data.seq_len = 64
  config.train.global_batch_size, config.train.grad_accum_steps = 6, 4
  with pytest.raises(
    ValueError, match="global_batch_size 6 is not divisible by train.grad_accum_steps 4"
  ):
    resolve.check_compatible(get_config("tiny"), config, None)

  config.train.global_batch_size, config.train.grad_accum_steps = 160, 10
  with pytest.raises(
    ValueError, match=r"micro-batch .* = 16 rows cannot be split over the 32 batch shards"
  ):
    resolve.check_batch_layout(config, {"data": 1, "fsdp": 32, "tensor": 1})
  resolve.check_batch_layout(config, {"data": 2, "fsdp": 8, "tensor": 4})

  # lm and sft data shards must split the global batch (and the processes, test_pipeline).
  config.train.global_batch_size, config.train.grad_accum_steps = 8, 1
  config.data.kind, config.data.shards = "lm", 3
  with pytest.raises(ValueError, match="data.shards 3 does not divide the global batch of 8 rows"):
    resolve.check_compatible(get_config("tiny"), config, None)
  config.data.kind, config.data.shards = "synthetic", 0

  # A workdir with checkpoints of another architecture is refused, not overwritten.
  resolve.bootstrap_workdir(str(tmp_path), config, get_config("tiny"), None)
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"holds checkpoints of another model .* \['dim', 'ffn_dim'"):
    resolve.bootstrap_workdir(str(tmp_path), config, get_config("tiny", dim=128, ffn_dim=256), None)
  with pytest.raises(ValueError, match="contradict"):
    config.model.dim = 32
    resolve.model_config(config, str(tmp_path))


def test_a_negative_step_count_and_a_corpus_without_validation_stop_before_compiling(tmp_path):
  import subprocess
  import sys

  from helpers import REPO

  from astrollama_jax.data import demo_tokenizer

  tokenizer = demo_tokenizer.ensure(tmp_path / "tokenizer")  # configs/demo.py's own vocabulary
  corpus = tmp_path / "corpus"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "prepare",
      "--source=data/demo_corpus/abstracts.jsonl",
      f"--output={corpus}",
      "--validation_fraction=0",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  base = [
    f"--config.data.lm.path={corpus}",
    f"--config.data.tokenizer_path={tokenizer}",
    "--config.train.num_steps=2",
  ]
  cases = [
    (["--config.train.num_steps=-3"], "train.num_steps=-3, train.num_epochs=1: give a positive"),
    (
      ["--config.train.num_steps=0", "--config.train.num_epochs=0"],
      "train.num_steps=0, train.num_epochs=0",
    ),
    ([], "has no validation records (prepare it with --validation_fraction > 0"),
  ]
  (tmp_path / "a_file").write_text("kept")
  bad_workdirs = [
    (tmp_path / "a_file", "is a file; give a folder"),
    (tmp_path / "a_file" / "run", "is a file, not a folder"),
  ]
  # Every refusal at once: each is its own short process start-up.
  procs = [
    start(train_cmd(tmp_path / f"run{i}", *base, *extra), 1, tmp_path / f"run{i}.log")
    for i, (extra, _) in enumerate(cases)
  ] + [
    start(train_cmd(workdir, *base), 1, tmp_path / f"file{i}.log")
    for i, (workdir, _) in enumerate(bad_workdirs)
  ]
  try:
    rcs = [proc.wait(timeout=240) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (_, message) in enumerate(cases):
    workdir = tmp_path / f"run{i}"
    text = tail(tmp_path / f"run{i}.log")
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert rcs[i] == 1 and len(errors) == 1 and message in errors[0], text
    assert "per-device memory" not in text and "Traceback" not in text, text  # before compiling
    assert not workdir.exists(), "a refused run leaves no workdir"
  for i, (workdir, message) in enumerate(bad_workdirs):
    assert rcs[len(cases) + i] == 1
    errors = [line for line in tail(tmp_path / f"file{i}.log").splitlines() if "error:" in line]
    assert errors and f"--workdir {workdir}" in errors[-1] and message in errors[-1], errors
  assert (tmp_path / "a_file").read_text() == "kept"
  # With evaluation off the same corpus trains.
  off = ["--config.eval.every=0", "--config.eval.at_start=False", "--config.eval.at_end=False"]
  summary = finish(
    start(train_cmd(tmp_path / "ok", *base, *off), 1, tmp_path / "ok.log"), tmp_path / "ok.log"
  )
  assert summary["final_step"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
  # A huge learning rate makes the first update overflow; every later loss is NaN and skipped.
  # (A NaN learning rate itself is refused before the run starts.)
  workdir, log = tmp_path / "nan", tmp_path / "nan.log"
  proc = start(
    train_cmd(
      workdir,
      *SYNTHETIC,
      "--config.train.num_steps=50",
      "--config.schedule.learning_rate=1e18",
      "--config.schedule.kind=constant",
      "--config.schedule.warmup_ratio=0",
      "--config.train.max_consecutive_nonfinite=3",
    ),
    1,
    log,
  )
  assert proc.wait(timeout=240) == 3, tail(log)
  assert "3 consecutive steps with a non-finite loss or gradient up to step 4" in tail(log)
  skipped = [r["skipped"] for r in records(workdir, "train")]
  assert skipped == [0, 1, 1, 1]


def test_training_starts_from_an_hf_folder(tmp_path):
  """``init_checkpoint`` may be an HF folder: its architecture and weights start the run."""
  from hf_reference import save_hf_model

  from astrollama_jax.checkpoints import locate
  from astrollama_jax.model.config import LlamaConfig

  cfg = LlamaConfig(
    vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64
  )
  save_hf_model(cfg, tmp_path / "hf", seed=3)
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  summary = finish(
    start(
      train_cmd(
        workdir,
        *SYNTHETIC,
        "--config.train.num_steps=2",
        f"--config.init_checkpoint={tmp_path / 'hf'}",
      ),
      1,
      log,
    ),
    log,
  )
  assert summary["final_step"] == 2
  assert "initialised from" in tail(log, 100_000)
  assert locate.read_model_config(str(workdir)).dim == 64
