"""Training runs in subprocesses: the command, its environment, its summary and metrics; kill -9
and resume; several processes of one ``jax.distributed`` job on loopback."""

from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path
import random
import signal
import subprocess
import sys
import time

from helpers import REPO, free_port
import jax
import numpy as np

# A model small enough for seconds per run, with the real 32,000-piece vocabulary (the demo
# preset's own is its demo tokenizer's).
TINY_MODEL = [
  "--config.model.vocab_size=32000",
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
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  return env


def train_cmd(workdir, *overrides: str, config: str = "configs/demo.py") -> list[str]:
  return [
    sys.executable,
    "-m",
    "astrollama_jax",
    "train",
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
    raise AssertionError(f"training timed out; log tail:\n{tail(log_path)}") from None
  if got != rc:
    raise AssertionError(f"training exited {got}, not {rc}; log tail:\n{tail(log_path)}")
  if not summary:
    return {}
  for line in reversed(pathlib.Path(log_path).read_text(errors="replace").splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise AssertionError(f"no JSON summary; log tail:\n{tail(log_path)}")


def tail(path, n: int = 4000) -> str:
  return pathlib.Path(path).read_text(errors="replace")[-n:]


def records(workdir, kind: str) -> list[dict]:
  from astrollama_jax.train.metrics import read_jsonl

  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [r for r in read_jsonl(str(path)) if r["kind"] == kind] if path.exists() else []


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


# --- kill -9 and resume -------------------------------------------------------------------

STEPS, EVERY = 9, 3
# A tiny LM run that checkpoints every EVERY steps and logs every batch's digest.
RESUME_RUN = [
  *TINY_MODEL,
  "--config.data.seq_len=64",
  "--config.train.global_batch_size=4",
  f"--config.train.num_steps={STEPS}",
  f"--config.checkpoint.every={EVERY}",
  "--config.checkpoint.keep=10",
  "--config.log.every=1",
  "--config.log.batch_hashes=True",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=False",
  "--config.loss.chunk_size=0",
]


def wait_for(cond, proc, timeout=180.0):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before the kill point")
    time.sleep(0.05)
  raise AssertionError("kill point not reached in time")


def final_state(workdir):
  import orbax.checkpoint as ocp

  from astrollama_jax.checkpoints import loader

  loaded = loader.load_model(str(workdir))
  assert loaded.step == STEPS
  opt = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(STEPS), "opt_state")
  )
  return loaded.params, opt


def kill_and_resume(tmp_path, cmd, last_kill_step):
  """Run ``cmd(workdir)`` whole, and again killed with -9 at a random step after the first
  checkpoint, then restarted. Returns (whole workdir, broken workdir, summary, killed_after)."""
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  kill_at = random.Random().randint(EVERY + 1, last_kill_step)
  ref = start(cmd(whole), 1, tmp_path / "whole.log")
  victim = start(cmd(broken), 1, tmp_path / "broken.log")
  try:
    wait_for(
      lambda: (
        (broken / "checkpoints" / str(EVERY)).is_dir()
        and any(r["step"] >= kill_at for r in records(broken, "train"))
      ),
      victim,
    )
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
  finally:
    if victim.poll() is None:
      victim.kill()
  killed_after = max(r["step"] for r in records(broken, "train"))
  assert killed_after < STEPS, "the run finished before it was killed"
  summary = finish(start(cmd(broken), 1, tmp_path / "broken.log"), tmp_path / "broken.log")
  finish(ref, tmp_path / "whole.log")
  return whole, broken, summary, killed_after


def assert_same_losses_and_end_state(whole, broken):
  """Same logged losses, and bit-identical final parameters and optimizer state."""
  losses = {r["step"]: r["loss"] for r in records(whole, "train")}
  assert all(losses[r["step"]] == r["loss"] for r in records(broken, "train"))
  (p_whole, o_whole), (p_broken, o_broken) = final_state(whole), final_state(broken)

  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_whole, p_broken
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), o_whole, o_broken
  )


def start_processes(
  workdir, *args: str, processes: int, devices: int, log_dir, name: str, config="configs/demo.py"
) -> list[subprocess.Popen]:
  """``processes`` trainers of one ``jax.distributed`` job on loopback (``devices`` CPU devices
  each), logging to ``log_dir/{name}_{i}.log``."""
  port = free_port()
  return [
    start(
      train_cmd(
        workdir,
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
        config=config,
      ),
      devices,
      Path(log_dir) / f"{name}_{i}.log",
    )
    for i in range(processes)
  ]


def finish_processes(procs: list[subprocess.Popen], log_dir, name: str, timeout: float = 300):
  """Every process's ``finish`` (the summary of process 0, {} for the others; any still
  running after a failure is killed)."""
  try:
    return [
      finish(p, Path(log_dir) / f"{name}_{i}.log", timeout=timeout, summary=i == 0)
      for i, p in enumerate(procs)
    ]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
