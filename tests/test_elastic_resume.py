"""A checkpoint resumes on another process count, mesh and device count (synthetic data).

Parameters and optimizer state reshard on restore; the data position of the synthetic kind is
global (the number of global batches read), so it carries over to any process count, and the
resumed steps read exactly the rows and reach the losses of an uninterrupted run. A per-process
position (lm, sft) stops the run with one line instead (``test_restore_errors``).
"""

from helpers import TINY_MODEL, finish, free_port, records, start, train_cmd
import numpy as np

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


def _run(tmp_path, workdir, name: str, steps: int, processes: int, devices: int, mesh: str) -> dict:
  args = [*RUN, f"--config.train.num_steps={steps}", f"--config.mesh={mesh}"]
  if processes == 1:
    return finish(
      start(train_cmd(workdir, *args), devices, tmp_path / f"{name}.log"),
      tmp_path / f"{name}.log",
      timeout=300,
    )
  port = free_port()
  procs = [
    start(
      train_cmd(
        workdir,
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
      ),
      devices // processes,
      tmp_path / f"{name}_{i}.log",
    )
    for i in range(processes)
  ]
  try:
    out = [
      finish(p, tmp_path / f"{name}_{i}.log", timeout=300, summary=i == 0)
      for i, p in enumerate(procs)
    ]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out[0]


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in records(workdir, "train")}


def _hashes(workdir) -> dict[int, str]:
  return {r["step"]: r["hash"] for r in records(workdir, "batch")}


def test_resume_on_other_process_counts_meshes_and_devices(tmp_path):
  whole = tmp_path / "whole"
  _run(tmp_path, whole, "whole", STEPS, 1, 8, "(1,8,1)")
  want_loss, want_hash = _losses(whole), _hashes(whole)
  assert sorted(want_loss) == list(range(1, STEPS + 1))

  cases = {
    "2x4_to_1x8": ((2, 8, "(2,2,2)"), (1, 8, "(1,8,1)")),
    "1x8_to_2x4": ((1, 8, "(1,8,1)"), (2, 8, "(2,2,2)")),
    "8_to_4_devices": ((1, 8, "(1,8,1)"), (1, 4, "(1,4,1)")),
  }
  for name, (before, after) in cases.items():
    workdir = tmp_path / name
    first = _run(tmp_path, workdir, f"{name}_a", 3, *before)
    assert first["final_step"] == 3
    second = _run(tmp_path, workdir, f"{name}_b", STEPS, *after)
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
    if after[0] == 1:  # one process logs the whole batch: the very rows of the uninterrupted run
      hashes = _hashes(workdir)
      assert [hashes[s] for s in range(4, STEPS + 1)] == [want_hash[s] for s in range(4, STEPS + 1)]
