"""A failed restore is classified: corrupt bytes fall back, incompatible runs and I/O errors stop.

The runs are in-process (a tiny model on synthetic data over the test process's 8 CPU devices), so
that a transient error can be injected into the restore itself.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib

from helpers_train import SYNTHETIC, records, start, tail, train_cmd
import pytest

from astrollama_jax.train import loop, run_state
from astrollama_jax.train.defaults import base_config


def _config(steps: int, **changes):
  c = base_config()
  c.model.update(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=128,
    vocab_size=1024,
    compute_dtype="float32",
  )
  c.data.kind, c.data.synthetic.num_rows, c.data.seq_len = "synthetic", 64, 32
  c.train.global_batch_size, c.train.num_steps = 8, steps
  c.log.every, c.eval.every, c.eval.at_start, c.eval.at_end = 1, 0, False, False
  c.checkpoint.every, c.checkpoint.keep = 3, 5
  c.loss.chunk_size = 0
  for key, value in changes.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture()
def run6(tmp_path):
  """A workdir with checkpoints of steps 3 and 6."""
  workdir = tmp_path / "run"
  loop.train(_config(6), str(workdir))
  assert _steps(workdir) == [3, 6]
  return workdir


def _fail_first(monkeypatch, n: int, error: Exception) -> list[int]:
  """Make the first ``n`` array restores raise ``error``; returns the list of attempts."""
  calls: list[int] = []
  real = run_state.Checkpointer._restore_items

  def flaky(self, step, target, data_iter):
    calls.append(step)
    if len(calls) <= n:
      raise error
    return real(self, step, target, data_iter)

  monkeypatch.setattr(run_state.Checkpointer, "_restore_items", flaky)
  monkeypatch.setattr(run_state, "RETRY_DELAY_S", 0.01)
  return calls


def test_transient_io_errors_are_retried_and_the_run_resumes(run6, monkeypatch):
  calls = _fail_first(monkeypatch, 2, OSError(errno.EIO, "Input/output error", "params/d/x"))
  summary = loop.train(_config(8), str(run6))
  assert summary["resumed_from"] == 6 and summary["final_step"] == 8
  assert calls == [6, 6, 6]
  assert not (run6 / "checkpoints_corrupt").exists()


def test_persistent_io_errors_stop_and_leave_the_checkpoint(run6, monkeypatch):
  calls = _fail_first(monkeypatch, 100, ValueError("UNAVAILABLE: Error reading local file"))
  with pytest.raises(
    run_state.TransientRestoreError,
    match=r"checkpoints/6 could not be read "
    r"after 5 attempts .*left in place",
  ):
    loop.train(_config(8), str(run6))
  assert calls == [6] * 5
  assert _steps(run6) == [3, 6] and not (run6 / "checkpoints_corrupt").exists()
  assert max(r["step"] for r in records(run6, "train")) == 6  # no step ran


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_transient_not_corrupt(run6, monkeypatch):
  monkeypatch.setattr(run_state, "RETRY_DELAY_S", 0.01)
  files = [p for p in (run6 / "checkpoints" / "6" / "params").rglob("*") if p.is_file()]
  for f in files:
    f.chmod(0)
  try:
    with pytest.raises(run_state.TransientRestoreError):
      loop.train(_config(8), str(run6))
  finally:
    for f in files:
      f.chmod(0o644)
  assert _steps(run6) == [3, 6]


def test_errno_and_message_classification():
  assert run_state.is_transient(OSError(errno.EIO, "io"))
  assert run_state.is_transient(PermissionError(errno.EACCES, "denied"))
  assert run_state.is_transient(TimeoutError())
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = ValueError("DEADLINE_EXCEEDED: reading chunk")
  assert run_state.is_transient(wrapped)
  assert not run_state.is_transient(FileNotFoundError(errno.ENOENT, "gone"))
  assert not run_state.is_transient(ValueError("DATA_LOSS: Error decoding manifest"))


def test_another_optimizer_layout_stops_before_touching_anything(run6):
  before = sorted(str(p) for p in run6.rglob("*"))
  config = _config(8)
  config.optimizer.moments_dtype = "bfloat16"
  with pytest.raises(
    run_state.IncompatibleCheckpointError,
    match=r"checkpoints/6 does not fit this run: the optimizer state layout "
    r"differs: .*mu.* is float32\[.*\] in the checkpoint, bfloat16\[.*\] "
    r"in this run",
  ):
    loop.train(config, str(run6))
  assert sorted(str(p) for p in run6.rglob("*") if "metrics" not in p.name) == [
    p for p in before if "metrics" not in os.path.basename(p)
  ]


def test_another_data_source_stops_naming_the_key(run6):
  with pytest.raises(
    run_state.IncompatibleCheckpointError, match=r"data.seed is 0 in the checkpoint, 5 now"
  ):
    loop.train(_config(8, **{"data.seed": 5}), str(run6))
  with pytest.raises(
    run_state.IncompatibleCheckpointError,
    match=r"train.global_batch_size is 8 in the checkpoint, 16 now",
  ):
    loop.train(_config(8, **{"train.global_batch_size": 16}), str(run6))
  assert _steps(run6) == [3, 6] and not (run6 / "checkpoints_corrupt").exists()


def _truncate(step_dir: pathlib.Path) -> None:
  biggest = max(
    (p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_truncated_bytes_fall_back_and_all_corrupt_never_starts_from_zero(run6):
  _truncate(run6 / "checkpoints" / "6")
  summary = loop.train(_config(7), str(run6))
  assert summary["resumed_from"] == 3 and summary["final_step"] == 7
  assert [p.name.split("-")[0] for p in (run6 / "checkpoints_corrupt").iterdir()] == ["6"]
  for step in _steps(run6):
    _truncate(run6 / "checkpoints" / str(step))
  with pytest.raises(
    run_state.NoUsableCheckpointError, match="no checkpoint in .* could be restored"
  ):
    loop.train(_config(9), str(run6))
  assert max(r["step"] for r in records(run6, "train")) == 7  # nothing ran from step 0


def _second_run(proc, log) -> str:
  """Wait for a run that must stop with exit 1 and one ``error:`` line; returns that line."""
  rc = proc.wait(timeout=240)
  out = pathlib.Path(log).read_text(errors="replace")
  errors = [line for line in out.splitlines() if line.startswith("error: ")]
  assert rc == 1 and len(errors) == 1 and "Traceback" not in out, out
  return errors[0]


def test_the_command_exits_non_zero_with_one_line_for_another_vocab(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  proc = start(train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=3"), 1, log)
  assert proc.wait(timeout=240) == 0, tail(log)
  proc = start(
    train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=5", "--config.model.vocab_size=2048"),
    1,
    tmp_path / "2.log",
  )
  out = _second_run(proc, tmp_path / "2.log")
  assert "vocab_size" in out
  assert _steps(workdir) == [3] and not (workdir / "checkpoints_corrupt").exists()


def test_the_command_exits_non_zero_with_one_line_for_another_optimizer(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  proc = start(train_cmd(workdir, *SYNTHETIC, "--config.train.num_steps=3"), 1, log)
  assert proc.wait(timeout=240) == 0, tail(log)
  proc = start(
    train_cmd(
      workdir, *SYNTHETIC, "--config.train.num_steps=5", "--config.optimizer.moments_dtype=bfloat16"
    ),
    1,
    tmp_path / "2.log",
  )
  assert "optimizer state layout differs" in _second_run(proc, tmp_path / "2.log")
  assert _steps(workdir) == [3] and not (workdir / "checkpoints_corrupt").exists()


def test_a_per_process_data_position_cannot_move_to_another_process_count(tmp_path):
  ckpt = run_state.Checkpointer(str(tmp_path), async_save=False)
  try:
    folder = tmp_path / "checkpoints" / "4" / run_state.DATA_ITER_DIR
    folder.mkdir(parents=True)
    for i, state in enumerate(['{"next_index": 4}', '{"next_index": 4}']):
      (folder / f"process_{i}-of-2.json").write_text(state)
    assert ckpt._global_position(4, 2) == '{"next_index": 4}'  # synthetic: the same everywhere
    (folder / "process_1-of-2.json").write_text('{"next_index": 4, "packer": [7]}')
    assert ckpt._global_position(4, 2) is None  # lm/sft packing: each process its own
  finally:
    ckpt.close()


def test_a_position_kept_per_data_shard_regathers_onto_another_process_count(tmp_path):
  ckpt = run_state.Checkpointer(str(tmp_path), async_save=False)
  try:
    folder = tmp_path / "checkpoints" / "4" / run_state.DATA_ITER_DIR
    folder.mkdir(parents=True)
    saved = [{"shards": {"0": {"i": 0}, "1": {"i": 1}}}, {"shards": {"2": {"i": 2}, "3": {"i": 3}}}]
    for i, state in enumerate(saved):
      (folder / f"process_{i}-of-2.json").write_text(json.dumps(state))
    merged = {"shards": {str(j): {"i": j} for j in range(4)}}  # this test is 1 process
    assert json.loads(ckpt._global_position(4, 2)) == merged
    (folder / "process_1-of-2.json").write_text(json.dumps({"shards": {"3": {"i": 3}}}))
    assert ckpt._global_position(4, 2) is None  # shard 2 is in no file: nothing to resume from
  finally:
    ckpt.close()


def test_what_reads_back_whole_but_does_not_fit_moves_nothing(run6):
  """A data position this pipeline does not take, a train_meta without a key the restore needs:
  neither is corrupt bytes, so the run stops in one line and every checkpoint stays."""
  position = run6 / "checkpoints" / "6" / run_state.DATA_ITER_DIR / "process_0-of-1.json"
  saved = position.read_text()
  position.write_text(json.dumps({"next_position": 6}))
  before = sorted(str(p) for p in (run6 / "checkpoints").rglob("*"))
  with pytest.raises(
    run_state.IncompatibleCheckpointError,
    match=r"checkpoints/6 does not fit this run: its data position does not fit this run's data "
    r"pipeline \(KeyError: .*next_index.*\).*\(nothing was changed\)",
  ):
    loop.train(_config(8), str(run6))
  position.write_text(saved)
  meta = run6 / "checkpoints" / "6" / "train_meta" / "metadata"
  good = meta.read_text()
  meta.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "rng"}))
  with pytest.raises(
    run_state.IncompatibleCheckpointError, match=r"its train_meta has no \['rng'\]"
  ):
    loop.train(_config(8), str(run6))
  assert sorted(str(p) for p in (run6 / "checkpoints").rglob("*")) == before
  assert not (run6 / run_state.CORRUPT_DIR).exists()
  meta.write_text(good)
  assert loop.train(_config(8), str(run6))["resumed_from"] == 6
