"""kill -9 a training run at a random step, restart it: bit-identical result, same batches."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_cli import REPO, TINY_MODEL, finish, records, start, train_cmd

STEPS, EVERY = 9, 3
RUN = [
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_path):
  out = tmp_path_factory.mktemp("corpus")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax.prepare",
      "--source=data/demo_corpus",
      f"--output={out}",
      "--validation_fraction=0.15",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
    timeout=120,
  )
  return [f"--config.data.lm.path={out}", f"--config.data.tokenizer_path={tokenizer_path}"]


def _wait_for(cond, proc, timeout=180.0):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before the kill point")
    time.sleep(0.05)
  raise AssertionError("kill point not reached in time")


def _final(workdir):
  import orbax.checkpoint as ocp
  from astrollama_jax import checkpoints

  loaded = checkpoints.load_model(str(workdir))
  assert loaded.step == STEPS
  opt = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(STEPS), "opt_state")
  )
  return loaded.params, opt


def kill_and_resume(tmp_path, cmd, last_kill_step):
  """Run ``cmd(workdir)`` whole, and again killed with -9 at a random step after the first
  checkpoint and restarted. Returns (whole workdir, broken workdir, resumed summary, killed_after)."""
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  kill_at = random.Random().randint(EVERY + 1, last_kill_step)
  ref = start(cmd(whole), 1, tmp_path / "whole.log")
  victim = start(cmd(broken), 1, tmp_path / "broken.log")
  try:
    _wait_for(
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
  (p_whole, o_whole), (p_broken, o_broken) = _final(whole), _final(broken)
  import jax

  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_whole, p_broken
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), o_whole, o_broken
  )


def test_kill9_and_resume_is_bit_identical(tmp_path, corpus):
  whole, broken, summary, killed_after = kill_and_resume(
    tmp_path, lambda workdir: train_cmd(workdir, *RUN, *corpus), STEPS - 2
  )
  assert EVERY <= summary["resumed_from"] <= killed_after, summary
  assert summary["final_step"] == STEPS

  # Same batches: every step's batch digest (including the steps done twice) matches.
  want = {r["step"]: r["hash"] for r in records(whole, "batch")}
  assert sorted(want) == list(range(1, STEPS + 1))
  got = records(broken, "batch")
  assert {r["step"] for r in got} == set(want)
  assert [r["step"] for r in got if r["hash"] != want[r["step"]]] == []
  redone = [r["step"] for r in got]
  assert len(redone) > STEPS or summary["resumed_from"] == killed_after

  assert_same_losses_and_end_state(whole, broken)
