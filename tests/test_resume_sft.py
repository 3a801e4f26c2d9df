"""Chat SFT through the same train command resumes like CPT: kill -9 after the first checkpoint,
restart, and the result is bit-identical to an uninterrupted run that consumed the same batches.

SFT's data iterator (mixture sampling, shuffling, first-fit packing of whole conversations) is
different from the corpus pipeline, so its checkpointed state gets its own test.
"""

import os
import random
import signal

import numpy as np

from test_resume import EVERY, STEPS, _final, _wait_for
from test_train_cli import TINY_MODEL, finish, records, start, train_cmd

# configs/demo_sft.py's shape (packed chat rows, chunked loss) with the tiny model, from a random init.
RUN = [*TINY_MODEL, "--config.init_checkpoint=", "--config.data.seq_len=128",
       "--config.train.global_batch_size=4", f"--config.train.num_steps={STEPS}",
       f"--config.train.checkpoint_every={EVERY}", "--config.train.keep_checkpoints=10",
       "--config.train.log_every=1", "--config.train.log_batch_hashes=True"]


def test_sft_kill9_and_resume_is_bit_identical(tmp_path, tokenizer_path):
  def cmd(workdir):
    return train_cmd(workdir, *RUN, f"--config.data.tokenizer_path={tokenizer_path}",
                     config="configs/demo_sft.py")

  whole, broken = tmp_path / "whole", tmp_path / "broken"
  kill_at = random.Random().randint(EVERY + 1, STEPS - 3)  # leaves steps to kill it in
  ref = start(cmd(whole), 1, tmp_path / "whole.log")
  victim = start(cmd(broken), 1, tmp_path / "broken.log")
  try:
    _wait_for(lambda: (broken / "checkpoints" / str(EVERY)).is_dir()
              and any(r["step"] >= kill_at for r in records(broken, "train")), victim)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
  finally:
    if victim.poll() is None:
      victim.kill()
  killed_after = max(r["step"] for r in records(broken, "train"))
  assert killed_after < STEPS, "the run finished before it was killed"
  summary = finish(start(cmd(broken), 1, tmp_path / "broken.log"), tmp_path / "broken.log")
  finish(ref, tmp_path / "whole.log")
  assert EVERY <= summary["resumed_from"] <= killed_after and summary["final_step"] == STEPS, summary

  # The same packed chat batch at every step, including the steps done twice after the restart.
  want = {r["step"]: r["hash"] for r in records(whole, "batch")}
  assert sorted(want) == list(range(1, STEPS + 1))
  got = records(broken, "batch")
  assert {r["step"] for r in got} == set(want)
  assert [r["step"] for r in got if r["hash"] != want[r["step"]]] == []
  assert len(set(want.values())) == STEPS  # the steps did read different conversations

  losses = {r["step"]: r["loss"] for r in records(whole, "train")}
  assert all(losses[r["step"]] == r["loss"] for r in records(broken, "train"))
  (p_whole, o_whole), (p_broken, o_broken) = _final(whole), _final(broken)
  import jax
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_whole, p_broken)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), o_whole, o_broken)
