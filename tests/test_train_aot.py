"""AOT compilation of real configs' train steps for fake device meshes (nothing allocated)."""

import json
import subprocess
import sys

from helpers import REPO
from helpers_train import train_env
import pytest


def _aot(*args: str) -> dict:
  out = subprocess.run(
    [sys.executable, "-m", "astrollama_jax", "aot", *args],
    cwd=REPO,
    env=train_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_llama2_7b_step_plan_on_8_devices():
  r = _aot("--config=configs/llama2_cpt.py:7b", "--devices=8")
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["micro_batch"] == 40
  # The state is the arguments: 6.74e9 params x (4 + 4 + 4) bytes / 8 devices, evenly sharded.
  assert r["state_gb_analytic"] == pytest.approx(6.738415616 * 12 / 8, rel=1e-6)
  assert r["arguments_gb"] == pytest.approx(r["state_gb_analytic"], rel=0.01)
  assert r["aliased_gb"] == pytest.approx(
    r["arguments_gb"], rel=0.01
  )  # donated state comes back in place
  assert 0 < r["temp_gb"] and r["total_gb"] < 80 and r["fits"]


def _aot_error(*args: str) -> str:
  out = subprocess.run(
    [sys.executable, "-m", "astrollama_jax", "aot", *args],
    cwd=REPO,
    env=train_env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode != 0
  return out.stderr


def test_layouts_that_cannot_work_are_refused_by_name():
  assert "mesh (1, 32, 2) needs 64 devices, have 48" in _aot_error(
    "--config=configs/llama2_cpt.py:70b", "--devices=48"
  )
  assert (
    "train.global_batch_size = 160 rows cannot be split over the 64 batch shards"
    in _aot_error("--config=configs/llama2_cpt.py:70b", "--devices=64", "--config.mesh=(1,64,1)")
  )
