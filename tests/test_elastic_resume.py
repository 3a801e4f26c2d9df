"""A checkpoint resumes on another process count, mesh and device count, for every data kind.

Parameters and optimizer state reshard on restore. The data position of the synthetic kind is
global (the number of global batches read); lm and sft data keep one position per virtual data
shard, which the processes of the new count regather. Either way the resumed steps read exactly
the global batches (the logged hash covers the rows of every process, in order) and reach the
losses of an uninterrupted run: no record skipped, none repeated.
"""

from helpers import TOKENIZER, need, prepare_demo_corpus
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
import pytest

RUN = [
  *TINY_MODEL,
  "--config.model.vocab_size=1024",
  "--config.data.kind=synthetic",
  "--config.data.synthetic.num_rows=64",
  "--config.data.seq_len=32",
  "--config.train.global_batch_size=8",
  "--config.log.every=1",
  "--config.log.batch_hashes=True",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=False",
  "--config.checkpoint.every=3",
  "--config.checkpoint.keep=5",
  "--config.schedule.learning_rate=1e-2",
  "--config.schedule.warmup_ratio=0.0",
  "--config.schedule.end_lr_ratio=1.0",
  "--config.loss.chunk_size=0",
]  # lr: not f(num_steps)
STEPS = 6


def _run(
  tmp_path,
  workdir,
  name: str,
  steps: int,
  processes: int,
  devices: int,
  mesh: str,
  run=RUN,
  config: str = "configs/demo.py",
) -> dict:
  args = [*run, f"--config.train.num_steps={steps}", f"--config.mesh={mesh}"]
  if processes == 1:
    return finish(
      start(train_cmd(workdir, *args, config=config), devices, tmp_path / f"{name}.log"),
      tmp_path / f"{name}.log",
      timeout=300,
    )
  procs = start_processes(
    workdir,
    *args,
    processes=processes,
    devices=devices // processes,
    log_dir=tmp_path,
    name=name,
    config=config,
  )
  return finish_processes(procs, tmp_path, name)[0]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in records(workdir, "train")}


def _hashes(workdir) -> dict[int, str]:
  return {r["step"]: r["hash"] for r in records(workdir, "batch")}


CASES = {
  "2x4_to_1x8": ((2, 8, "(2,2,2)"), (1, 8, "(1,8,1)")),
  "1x8_to_2x4": ((1, 8, "(1,8,1)"), (2, 8, "(2,2,2)")),
  "8_to_4_devices": ((1, 8, "(1,8,1)"), (1, 4, "(1,4,1)")),
}


def _uninterrupted(tmp_path, run=RUN, config="configs/demo.py") -> tuple[dict, dict]:
  """(losses, batch hashes) by step of one run of STEPS steps on 1 process x 8 devices."""
  whole = tmp_path / "whole"
  _run(tmp_path, whole, "whole", STEPS, 1, 8, "(1,8,1)", run, config)
  want_loss, want_hash = _losses(whole), _hashes(whole)
  assert sorted(want_loss) == sorted(want_hash) == list(range(1, STEPS + 1))
  assert len(set(want_hash.values())) == STEPS  # every step read other records
  return want_loss, want_hash


def _check_case(tmp_path, name, want, run=RUN, config="configs/demo.py") -> None:
  """3 steps on one layout, 3 more on another: the global batches and losses of ``want``."""
  want_loss, want_hash = want
  before, after = CASES[name]
  workdir = tmp_path / name
  first = _run(tmp_path, workdir, f"{name}_a", 3, *before, run, config)
  assert first["final_step"] == 3
  second = _run(tmp_path, workdir, f"{name}_b", STEPS, *after, run, config)
  assert second["resumed_from"] == 3 and second["final_step"] == STEPS, name
  assert not (workdir / "checkpoints_corrupt").exists(), name
  got = _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1)), name  # each step once: none skipped/repeated
  np.testing.assert_allclose(
    [got[s] for s in range(1, STEPS + 1)],
    [want_loss[s] for s in range(1, STEPS + 1)],
    rtol=2e-5,
    err_msg=name,
  )
  hashes = _hashes(workdir)  # of the global batch, whatever the process count
  assert [hashes[s] for s in range(1, STEPS + 1)] == [want_hash[s] for s in range(1, STEPS + 1)]


def test_resume_on_other_process_counts_meshes_and_devices(tmp_path):
  want = _uninterrupted(tmp_path)
  for name in CASES:
    _check_case(tmp_path, name, want)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  need(TOKENIZER)
  out = tmp_path_factory.mktemp("corpus")
  prepare_demo_corpus(out)
  return out


def _data_run(*data: str) -> list[str]:
  """RUN on real data: the demo's shape, default data.shards (one per row of the batch)."""
  synthetic = ("--config.model.vocab_size", "--config.data.kind", "--config.data.s")
  return [a for a in RUN if not a.startswith(synthetic)] + [
    f"--config.data.tokenizer_path={TOKENIZER}",
    "--config.model.vocab_size=32000",
    "--config.init_checkpoint=",
    *data,
  ]


def _lm_run(corpus) -> list[str]:
  return _data_run(
    "--config.data.kind=lm", f"--config.data.lm.path={corpus}", "--config.data.seq_len=64"
  )


SFT_RUN = _data_run("--config.data.seq_len=128")


@pytest.fixture(scope="module")
def lm_whole(tmp_path_factory, corpus):
  return _uninterrupted(tmp_path_factory.mktemp("lm"), _lm_run(corpus))


@pytest.fixture(scope="module")
def sft_whole(tmp_path_factory):
  need(TOKENIZER)
  return _uninterrupted(tmp_path_factory.mktemp("sft"), SFT_RUN, "configs/demo_sft.py")


# A device-count change on one process keeps every process's shards: the synthetic test covers it.
@pytest.mark.parametrize("case", ["2x4_to_1x8", "1x8_to_2x4"])
def test_lm_data_resumes_on_other_process_counts(tmp_path, corpus, lm_whole, case):
  _check_case(tmp_path, case, lm_whole, _lm_run(corpus))


# sft shares the shard machinery with lm (regathering across counts is also checked in process
# by test_chat_dataset.py): one real resume across a process count is enough here.
@pytest.mark.parametrize("case", ["2x4_to_1x8"])
def test_sft_data_resumes_on_other_process_counts(tmp_path, sft_whole, case):
  _check_case(tmp_path, case, sft_whole, SFT_RUN, "configs/demo_sft.py")
