"""A data position saved with one Grain reader worker count, resumed with another.

No worker and one worker read the same batches (one worker reads the whole stream), so a
checkpoint moves between them and the batches go on as if uninterrupted; two or more workers each
pack their own slice of the records, another order, so such a change is refused in one line and
the checkpoints stay where they are. The runs are in-process, a tiny model on the demo corpus.
"""

from __future__ import annotations

import shutil

from absl import flags
from helpers import prepare_demo_corpus
from helpers_train import records
import pytest

from astrollama_jax.train import loop, run_state
from astrollama_jax.train.defaults import base_config

flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return prepare_demo_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus, tokenizer_path, steps: int, workers: int):
  c = base_config()
  c.model.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, compute_dtype="float32")
  c.data.lm.path, c.data.tokenizer_path = str(corpus), tokenizer_path
  c.data.seq_len, c.data.lm.worker_count = 64, workers
  c.train.global_batch_size, c.train.num_steps = 8, steps
  c.log.every, c.log.batch_hashes = 1, True
  c.eval.every, c.eval.at_start, c.eval.at_end = 0, False, False
  c.checkpoint.every, c.checkpoint.keep = 2, 10
  c.loss.chunk_size = 0
  return c


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _hashes(workdir) -> dict[int, str]:
  return {r["step"]: r["hash"] for r in records(workdir, "batch")}  # the latest of a step wins


@pytest.mark.timeout(600)
def test_a_data_position_follows_a_worker_count_that_keeps_the_order(
  tmp_path, corpus, tokenizer_path
):
  workdir = tmp_path / "run"
  run = lambda steps, workers: loop.train(  # noqa: E731
    _config(corpus, tokenizer_path, steps, workers), str(workdir)
  )
  run(6, 0)
  whole = _hashes(workdir)
  assert _steps(workdir) == [2, 4, 6] and sorted(whole) == [1, 2, 3, 4, 5, 6]
  for step in (4, 6):
    shutil.rmtree(workdir / "checkpoints" / str(step))

  summary = run(4, 1)  # saved without workers, resumed with one
  assert summary["resumed_from"] == 2 and summary["final_step"] == 4
  assert _hashes(workdir) == whole  # steps 3 and 4 read the batches of the uninterrupted run

  before = sorted(str(p) for p in (workdir / "checkpoints").rglob("*"))
  with pytest.raises(
    run_state.IncompatibleCheckpointError,
    match=r"checkpoints/4 does not fit this run: its data position was saved with 1 "
    r"data reader worker.*this run has 2.*order.*\(nothing was changed\)",
  ):
    run(6, 2)
  assert sorted(str(p) for p in (workdir / "checkpoints").rglob("*")) == before
  assert not (workdir / run_state.CORRUPT_DIR).exists()

  summary = run(6, 0)  # saved with one worker, resumed without
  assert summary["resumed_from"] == 4 and summary["final_step"] == 6
  assert _hashes(workdir) == whole
