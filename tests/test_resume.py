"""kill -9 a training run at a random step, restart it: bit-identical result, same batches."""

from helpers_train import (
  EVERY,
  RESUME_RUN,
  STEPS,
  assert_same_losses_and_end_state,
  kill_and_resume,
  records,
  train_cmd,
)
import pytest


@pytest.fixture(scope="module")
def corpus(demo_corpus, tokenizer_path):
  return [f"--config.data.lm.path={demo_corpus}", f"--config.data.tokenizer_path={tokenizer_path}"]


def test_kill9_and_resume_is_bit_identical(tmp_path, corpus):
  whole, broken, summary, killed_after = kill_and_resume(
    tmp_path, lambda workdir: train_cmd(workdir, *RESUME_RUN, *corpus), STEPS - 2
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
