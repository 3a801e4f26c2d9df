"""The train command end to end: preemption, corrupt checkpoints, bad configs (+ subprocess helpers)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A model small enough for seconds per run, with the real 32,000-piece vocabulary.
TINY_MODEL = [
  "--config.model.dim=64",
  "--config.model.n_layers=2",
  "--config.model.n_heads=4",
  "--config.model.n_kv_heads=2",
  "--config.model.ffn_dim=128",
]


def train_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_COMPILATION_CACHE_DIR=os.environ.get("ASTROLLAMA_JAX_CACHE", str(REPO / ".jax_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  return env


def train_cmd(workdir, *overrides: str, config: str = "configs/demo.py") -> list[str]:
  return [
    sys.executable,
    "-m",
    "astrollama_jax.train",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def start(cmd: list[str], devices: int, log_path) -> subprocess.Popen:
  log = open(log_path, "ab")
  return subprocess.Popen(
    cmd, cwd=REPO, env=train_env(devices), stdout=log, stderr=subprocess.STDOUT
  )


def finish(
  proc: subprocess.Popen, log_path, timeout: float = 240, summary: bool = True, rc: int = 0
) -> dict:
  """Wait for a run; return its JSON summary (the last stdout line), or fail with its log.

  Only process 0 prints a summary: pass ``summary=False`` for the others. ``rc``: the exit
  status expected (``exit_codes``: 75 after a preemption).
  """
  try:
    got = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"training timed out; log tail:\n{_tail(log_path)}")
  if got != rc:
    raise AssertionError(f"training exited {got}, not {rc}; log tail:\n{_tail(log_path)}")
  if not summary:
    return {}
  for line in reversed(pathlib.Path(log_path).read_text(errors="replace").splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise AssertionError(f"no JSON summary; log tail:\n{_tail(log_path)}")


def _tail(path, n: int = 4000) -> str:
  return pathlib.Path(path).read_text(errors="replace")[-n:]


def records(workdir, kind: str) -> list[dict]:
  from astrollama_jax.train.metrics import read_jsonl

  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [r for r in read_jsonl(str(path)) if r["kind"] == kind] if path.exists() else []


# --- tests ------------------------------------------------------------------------------------------

SYNTHETIC = [
  *TINY_MODEL,
  "--config.model.vocab_size=1024",
  "--config.data.kind=synthetic",
  "--config.data.synthetic.num_rows=64",
  "--config.data.seq_len=32",
  "--config.train.global_batch_size=4",
  "--config.log.every=1",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=False",
  "--config.checkpoint.every=3",
  "--config.checkpoint.keep=5",
]


def test_sigterm_saves_and_a_corrupt_latest_checkpoint_falls_back(tmp_path):
  import signal
  import time

  workdir, log = tmp_path / "run", tmp_path / "run.log"
  proc = start(train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=200"), 1, log)
  try:
    end = time.time() + 180
    while not any(r["step"] >= 4 for r in records(workdir, "train")):
      assert proc.poll() is None and time.time() < end, _tail(log)
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

  # Damage the newest checkpoint: the restart reports it, sets it aside and resumes from the one before.
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
  assert f"checkpoints/{stopped} cannot be restored" in _tail(log, 200_000)


def test_config_errors_name_the_setting(tmp_path):
  import pytest
  from astrollama_jax.model.config import get_config
  from astrollama_jax.train import setup
  from astrollama_jax.train.defaults import base_config

  config = base_config()
  config.data.kind = "synthetic"
  config.data.seq_len = 1024
  with pytest.raises(ValueError, match="seq_len 1024 exceeds the model's max_seq_len 512"):
    setup.check_compatible(get_config("tiny"), config, None)
  config.data.seq_len = 64
  config.train.global_batch_size, config.train.grad_accum_steps = 6, 4
  with pytest.raises(
    ValueError, match="global_batch_size 6 is not divisible by train.grad_accum_steps 4"
  ):
    setup.check_compatible(get_config("tiny"), config, None)

  config.train.global_batch_size, config.train.grad_accum_steps = 160, 10
  with pytest.raises(
    ValueError, match=r"micro-batch .* = 16 rows cannot be split over the 32 batch shards"
  ):
    setup.check_batch_layout(config, {"data": 1, "fsdp": 32, "tensor": 1})
  setup.check_batch_layout(config, {"data": 2, "fsdp": 8, "tensor": 4})

  # A workdir with checkpoints of another architecture is refused, not overwritten.
  config.train.global_batch_size, config.train.grad_accum_steps = 8, 1
  setup.bootstrap_workdir(str(tmp_path), config, get_config("tiny"), None)
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"holds checkpoints of another model .* \['dim', 'ffn_dim'"):
    setup.bootstrap_workdir(str(tmp_path), config, get_config("tiny", dim=128, ffn_dim=256), None)
  with pytest.raises(ValueError, match="contradict"):
    config.model.dim = 32
    setup.model_config(config, str(tmp_path))


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
  # A NaN learning rate makes the first update NaN; every later loss is NaN and skipped.
  workdir, log = tmp_path / "nan", tmp_path / "nan.log"
  proc = start(
    train_cmd(
      workdir,
      *SYNTHETIC,
      "--config.train.num_steps=50",
      "--config.schedule.learning_rate=nan",
      "--config.train.max_consecutive_nonfinite=3",
    ),
    1,
    log,
  )
  assert proc.wait(timeout=240) == 3, _tail(log)
  assert "3 consecutive steps with a non-finite loss or gradient up to step 4" in _tail(log)
  skipped = [r["skipped"] for r in records(workdir, "train")]
  assert skipped == [0, 1, 1, 1]


def test_training_starts_from_an_hf_folder(tmp_path):
  """``init_checkpoint`` may be an HF folder: its architecture and weights start the run."""
  from astrollama_jax import checkpoints
  from astrollama_jax.model.config import LlamaConfig
  from hf_reference import save_hf_model

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
  assert "initialised from" in _tail(log, 100_000)
  assert checkpoints.read_model_config(str(workdir)).dim == 64
