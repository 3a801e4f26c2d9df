"""A checkpoint resumes on another process count, mesh and device count, for every data kind.

Parameters and optimizer state reshard on restore. The data position of the synthetic kind is
global (the number of global batches read); lm and sft data keep one position per virtual data
shard, which the processes of the new count regather. Either way the resumed steps read exactly
the global batches (the logged hash covers the rows of every process, in order) and reach the
losses of an uninterrupted run: no record skipped, none repeated.
"""

from helpers import TOKENIZER, need
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


def _runs(tmp_path, runs: list[tuple], run=RUN, config: str = "configs/demo.py") -> list[dict]:
  """Start every ``(workdir, name, steps, processes, devices, mesh)`` run at once, then wait for
  each: process 0's summaries. Independent runs overlap their start-up (imports, compiles);
  any run still going after a failure is killed."""
  started = []
  for workdir, name, steps, processes, devices, mesh in runs:
    args = [*run, f"--config.train.num_steps={steps}", f"--config.mesh={mesh}"]
    if processes == 1:
      procs = [start(train_cmd(workdir, *args, config=config), devices, tmp_path / f"{name}.log")]
    else:
      procs = start_processes(
        workdir,
        *args,
        processes=processes,
        devices=devices // processes,
        log_dir=tmp_path,
        name=name,
        config=config,
      )
    started.append((name, procs))
  try:
    return [
      finish(procs[0], tmp_path / f"{name}.log", timeout=600)
      if len(procs) == 1
      else finish_processes(procs, tmp_path, name, timeout=600)[0]
      for name, procs in started
    ]
  finally:
    for _, procs in started:
      for p in procs:
        if p.poll() is None:
          p.kill()


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in records(workdir, "train")}


def _hashes(workdir) -> dict[int, str]:
  return {r["step"]: r["hash"] for r in records(workdir, "batch")}


CASES = {
  "2x4_to_1x8": ((2, 8, "(2,2,2)"), (1, 8, "(1,8,1)")),
  "1x8_to_2x4": ((1, 8, "(1,8,1)"), (2, 8, "(2,2,2)")),
  "8_to_4_devices": ((1, 8, "(1,8,1)"), (1, 4, "(1,4,1)")),
}


def _run_cases(tmp_path, names, run=RUN, config="configs/demo.py") -> tuple[tuple, dict]:
  """One uninterrupted run of STEPS steps on 1 process x 8 devices, and for each case 3 steps
  on one layout, then the rest on another: (want, {case: (first summary, second summary)}).

  The uninterrupted run and the first halves run together, then the second halves."""
  whole = tmp_path / "whole"
  firsts = _runs(
    tmp_path,
    [(whole, "whole", STEPS, 1, 8, "(1,8,1)")]
    + [(tmp_path / name, f"{name}_a", 3, *CASES[name][0]) for name in names],
    run,
    config,
  )[1:]
  want_loss, want_hash = _losses(whole), _hashes(whole)
  assert sorted(want_loss) == sorted(want_hash) == list(range(1, STEPS + 1))
  assert len(set(want_hash.values())) == STEPS  # every step read other records
  seconds = _runs(
    tmp_path,
    [(tmp_path / name, f"{name}_b", STEPS, *CASES[name][1]) for name in names],
    run,
    config,
  )
  return (want_loss, want_hash), dict(zip(names, zip(firsts, seconds)))


def _check_case(tmp_path, name, want, summaries) -> None:
  """3 steps on one layout, 3 more on another: the global batches and losses of ``want``."""
  want_loss, want_hash = want
  first, second = summaries
  workdir = tmp_path / name
  assert first["final_step"] == 3
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
  want, summaries = _run_cases(tmp_path, list(CASES))
  for name in CASES:
    _check_case(tmp_path, name, want, summaries[name])


@pytest.fixture(scope="module")
def corpus(demo_corpus):
  need(TOKENIZER)
  return demo_corpus


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


# A device-count change on one process keeps every process's shards: the synthetic test covers it.
LM_CASES = ["2x4_to_1x8", "1x8_to_2x4"]
# sft shares the shard machinery with lm (regathering across counts is also checked in process
# by test_chat_dataset.py): one real resume across a process count is enough here.
SFT_CASES = ["2x4_to_1x8"]


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, corpus):
  tmp = tmp_path_factory.mktemp("lm")
  return tmp, *_run_cases(tmp, LM_CASES, _lm_run(corpus))


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
  need(TOKENIZER)
  tmp = tmp_path_factory.mktemp("sft")
  return tmp, *_run_cases(tmp, SFT_CASES, SFT_RUN, "configs/demo_sft.py")


@pytest.mark.parametrize("case", LM_CASES)
def test_lm_data_resumes_on_other_process_counts(lm_runs, case):
  tmp, want, summaries = lm_runs
  _check_case(tmp, case, want, summaries[case])


@pytest.mark.parametrize("case", SFT_CASES)
def test_sft_data_resumes_on_other_process_counts(sft_runs, case):
  tmp, want, summaries = sft_runs
  _check_case(tmp, case, want, summaries[case])
