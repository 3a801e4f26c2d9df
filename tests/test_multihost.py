"""Two processes on loopback (jax.distributed, 4 fake CPU devices each) train like one with 8."""

from helpers_train import (
  TINY_MODEL,
  finish,
  finish_processes,
  records,
  start,
  start_processes,
  train_cmd,
)
import numpy as np

RUN = [
  *TINY_MODEL,
  "--config.model.vocab_size=1024",
  "--config.mesh=(2,2,2)",
  "--config.data.kind=synthetic",
  "--config.data.synthetic.num_rows=64",
  "--config.data.seq_len=32",
  "--config.train.global_batch_size=8",
  "--config.train.num_steps=3",
  "--config.log.every=1",
  "--config.log.batch_hashes=True",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.batches=1",
  "--config.schedule.learning_rate=1e-2",
  "--config.schedule.warmup_ratio=0.0",
]


def test_two_processes_match_one(tmp_path):
  one_dir, two_dir = tmp_path / "one", tmp_path / "two"
  one = start(train_cmd(one_dir, *RUN), 8, tmp_path / "one.log")
  procs = start_processes(two_dir, *RUN, processes=2, devices=4, log_dir=tmp_path, name="two")
  summaries = finish_processes(procs, tmp_path, "two")
  single = finish(one, tmp_path / "one.log", timeout=300)
  assert summaries[0]["final_step"] == single["final_step"] == 3

  want, got = records(one_dir, "train"), records(two_dir, "train")
  assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)
  np.testing.assert_allclose(
    [r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=1e-5
  )
  assert got[-1]["loss"] < got[0]["loss"]
  np.testing.assert_allclose(summaries[0]["eval"]["loss"], single["eval"]["loss"], rtol=1e-6)
  # Process 0 fed the first half of each global batch; the single process fed all of it.
  assert (two_dir / "checkpoints" / "3" / "data_iter" / "process_1-of-2.json").is_file()
