"""The train command end to end: preemption, corrupt checkpoints, bad configs (+ subprocess helpers)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A model small enough for seconds per run, with the real 32,000-piece vocabulary.
TINY_MODEL = ["--config.model.dim=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
              "--config.model.n_kv_heads=2", "--config.model.ffn_dim=128"]


def train_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("ASTROLLAMA_JAX_CACHE", str(REPO / ".jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", TF_CPP_MIN_LOG_LEVEL="2")
  return env


def train_cmd(workdir, *overrides: str, config: str = "configs/demo.py") -> list[str]:
  return [sys.executable, "-m", "astrollama_jax.train", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def start(cmd: list[str], devices: int, log_path) -> subprocess.Popen:
  log = open(log_path, "ab")
  return subprocess.Popen(cmd, cwd=REPO, env=train_env(devices), stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log_path, timeout: float = 240, summary: bool = True) -> dict:
  """Wait for a run; return its JSON summary (the last stdout line), or fail with its log.

  Only process 0 prints a summary: pass ``summary=False`` for the others.
  """
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"training timed out; log tail:\n{_tail(log_path)}")
  if rc != 0:
    raise AssertionError(f"training exited {rc}; log tail:\n{_tail(log_path)}")
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
