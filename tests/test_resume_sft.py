"""Chat SFT through the same train command resumes like CPT: kill -9 after the first checkpoint,
restart, and the result is bit-identical to an uninterrupted run that consumed the same batches.

SFT's data iterator (mixture sampling, shuffling, first-fit packing of whole conversations) is
different from the corpus pipeline, so its checkpointed state gets its own test.
"""

from helpers_train import (
  EVERY,
  STEPS,
  TINY_MODEL,
  assert_same_losses_and_end_state,
  kill_and_resume,
  records,
  train_cmd,
)

# configs/demo_sft.py's shape (packed chat rows, chunked loss), tiny model, random init.
RUN = [
  *TINY_MODEL,
  "--config.init_checkpoint=",
  "--config.data.seq_len=128",
  "--config.train.global_batch_size=4",
  f"--config.train.num_steps={STEPS}",
  f"--config.checkpoint.every={EVERY}",
  "--config.checkpoint.keep=10",
  "--config.log.every=1",
  "--config.log.batch_hashes=True",
]


def test_sft_kill9_and_resume_is_bit_identical(tmp_path, tokenizer_path):
  def cmd(workdir):
    return train_cmd(
      workdir, *RUN, f"--config.data.tokenizer_path={tokenizer_path}", config="configs/demo_sft.py"
    )

  whole, broken, summary, killed_after = kill_and_resume(
    tmp_path, cmd, STEPS - 3
  )  # leaves steps to kill in
  assert EVERY <= summary["resumed_from"] <= killed_after and summary["final_step"] == STEPS, (
    summary
  )

  # The same packed chat batch at every step, including the steps done twice after the restart.
  want = {r["step"]: r["hash"] for r in records(whole, "batch")}
  assert sorted(want) == list(range(1, STEPS + 1))
  got = records(broken, "batch")
  assert {r["step"] for r in got} == set(want)
  assert [r["step"] for r in got if r["hash"] != want[r["step"]]] == []
  assert len(set(want.values())) == STEPS  # the steps did read different conversations

  assert_same_losses_and_end_state(whole, broken)
