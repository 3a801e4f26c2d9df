"""A full disk (ENOSPC) in every writing command: a clear error naming the output and the free
space, no partial output that looks complete, nothing already done lost.

ENOSPC is simulated at the lowest write each path uses (a safetensors shard's writer, Orbax's
tensorstore writes, the ArrayRecord writer); free space is faked through ``shutil.disk_usage``.
"""

import collections
import errno
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

from helpers import REPO
from helpers_train import SYNTHETIC, finish, start, tail, train_cmd, train_env
from hf_reference import TINY_GQA
import jax
import numpy as np
from orbax.checkpoint.experimental import v1
import pytest

from astrollama_jax.checkpoints import loader, reader, writer
from astrollama_jax.commands.convert import convert
from astrollama_jax.commands.export import export
from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.corpus.build import build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.formats import hf
from astrollama_jax.model import llama
from astrollama_jax.util import diskspace

CFG = TINY_GQA


def _enospc():
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tiny_disk(monkeypatch, free=1000):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - free, free))


def _tree(path):
  """Every file under ``path`` with a digest of its bytes."""
  return {
    str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(pathlib.Path(path).rglob("*"))
    if p.is_file()
  }


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(np.asarray, llama.init_params(CFG, seed=5))


def test_every_form_of_enospc_becomes_one_clear_error(tmp_path):
  tensorstore_style = ValueError(
    'RESOURCE_EXHAUSTED: Error writing local file "/x/0": No space left '
    "on device [os_error_code='28']"
  )
  chained = RuntimeError("save failed")
  chained.__cause__ = _enospc()
  array_record_style = RuntimeError(
    "write() failed: No space left on device; writing /x; at byte 0"
  )
  for e in (
    _enospc(),
    OSError(errno.EDQUOT, "quota"),
    tensorstore_style,
    array_record_style,
    chained,
  ):
    assert diskspace.is_disk_full(e), e
  for e in (OSError(errno.EACCES, "denied"), ValueError("bad shape"), RuntimeError("disk full?")):
    assert not diskspace.is_disk_full(e), e

  out = tmp_path / "new" / "out"
  with pytest.raises(diskspace.DiskFullError) as info:
    with diskspace.disk_full_errors(str(out), "the output folder"):
      raise tensorstore_style
  assert info.value.errno == errno.ENOSPC and info.value.path == str(out)
  assert str(info.value).startswith(
    f"disk full: cannot write the output folder {out}: no space left"
  )
  assert " free there" in str(info.value)
  with pytest.raises(PermissionError):  # anything else passes through untouched
    with diskspace.disk_full_errors(str(out), "the output folder"):
      raise PermissionError(errno.EACCES, "denied")


def test_export_disk_full_mid_write_removes_the_partial_folder(params, tmp_path, monkeypatch):
  calls = []

  class ShardWriter(hf._ShardWriter):  # each shard file is opened by one writer
    def __init__(self, filename, specs):
      calls.append(filename)
      if len(calls) == 2:  # the second shard: half written, then the disk is full
        pathlib.Path(filename).write_bytes(b"\0" * 100)
        raise _enospc()
      super().__init__(filename, specs)

  monkeypatch.setattr(hf, "_ShardWriter", ShardWriter)
  out = tmp_path / "hf"
  with pytest.raises(
    diskspace.DiskFullError,
    match=f"disk full: cannot write the output folder {out}: "
    r"no space left on the device \(.* free there\)",
  ):
    hf.save_hf(CFG, params, str(out), max_shard_bytes=200_000)
  assert len(calls) == 2
  assert os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling


def test_export_refuses_up_front_when_the_disk_is_too_small(
  params, tmp_path, monkeypatch, tokenizer_path
):
  converted = writer.save_params(str(tmp_path / "ckpt"), CFG, params, tokenizer_path)

  def never(*a, **k):
    raise AssertionError("nothing may be restored or written")

  monkeypatch.setattr(loader, "load_model", never)
  monkeypatch.setattr(reader, "open_params", never)
  monkeypatch.setattr(hf, "_ShardWriter", never)
  _tiny_disk(monkeypatch)
  out = tmp_path / "hf"
  with pytest.raises(
    diskspace.DiskFullError,
    match=f"disk full: the output folder {out} needs .* but only 1000 bytes is free there",
  ):
    export(converted, str(out), show_progress=False)
  with pytest.raises(diskspace.DiskFullError, match="needs"):
    hf.save_hf(CFG, params, str(out))
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.filterwarnings(
  "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax's closed loop
def test_convert_disk_full_mid_write_and_up_front(params, tmp_path, monkeypatch, tokenizer_path):
  src = tmp_path / "src"
  hf.save_hf(CFG, params, str(src))
  real, calls = v1.partial.save, []

  def partial_save(path, tree, *args, **kwargs):
    calls.append(path)
    if len(calls) == 3:  # Orbax's write of the third parameter
      raise _enospc()
    return real(path, tree, *args, **kwargs)

  monkeypatch.setattr(v1.partial, "save", partial_save)
  out = tmp_path / "out"
  with pytest.raises(
    diskspace.DiskFullError, match=f"disk full: cannot write the output folder {out}: "
  ):
    convert("hf", str(src), str(out), tokenizer=tokenizer_path, show_progress=False)
  assert len(calls) == 3
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no DIR, no .out.partial

  calls.clear()
  with pytest.raises(
    diskspace.DiskFullError, match=f"disk full: cannot write the output folder {out}: "
  ):
    writer.save_params(str(out), CFG, params, tokenizer_path)
  assert sorted(os.listdir(tmp_path)) == ["src"]

  monkeypatch.undo()
  _tiny_disk(monkeypatch)
  with pytest.raises(
    diskspace.DiskFullError,
    match=f"disk full: the output folder {out} needs .* but only 1000 bytes is free",
  ):
    convert("hf", str(src), str(out), tokenizer=tokenizer_path, show_progress=False)
  with pytest.raises(diskspace.DiskFullError, match="but only 1000 bytes is free"):
    writer.save_params(str(out), CFG, params, tokenizer_path)
  assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize("where", ["records", "section_index"])
def test_prepare_disk_full_keeps_the_previous_dataset(tmp_path, monkeypatch, where):
  config = CorpusConfig(
    sources=[str(REPO / "data" / "demo_corpus")], validation_fraction=0.15, progress=False
  )
  out = tmp_path / "corpus"
  build(config, out)
  before = _tree(out)
  assert any(k.endswith(corpus.MANIFEST) for k in before) and any(
    ".array_record" in k for k in before
  )
  if where == "records":
    from array_record.python import array_record_module  # what TFDS's ArrayRecord adapter calls

    class FullWriter:
      def __init__(self, path, options):
        self.file = open(path, "wb")

      def write(self, record):
        self.file.write(record[:10])
        raise _enospc()

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullWriter)
  else:

    def savez(*a, **k):
      raise _enospc()

    monkeypatch.setattr(np, "savez", savez)
  with pytest.raises(
    diskspace.DiskFullError,
    match=f"disk full: cannot write the dataset under {out}: "
    r"no space left .*; the previous dataset there, if any, "
    "is unchanged",
  ):
    build(config, out)
  assert (
    _tree(out) == before
  )  # same files, same bytes: nothing half-replaced, no temporary folder left


def test_a_run_refuses_to_start_without_room_for_one_checkpoint(tmp_path, monkeypatch):
  from astrollama_jax.train.run_state import Checkpointer

  ckpt = Checkpointer(str(tmp_path / "run"))
  try:
    _tiny_disk(monkeypatch)
    with pytest.raises(
      diskspace.DiskFullError,
      match=f"disk full: a checkpoint of this run in "
      f"{tmp_path / 'run' / 'checkpoints'} needs 2.0 KiB but "
      "only 1000 bytes is free there; .* another --workdir",
    ):
      ckpt.check_free_space(2048)
    ckpt.check_free_space(1000)
  finally:
    ckpt.close()


# Runs the train command with Orbax's checkpoint save failing (ENOSPC) for one checkpoint step.
DRIVER = r"""
import errno, os, sys
import orbax.checkpoint as ocp
real, step = ocp.CheckpointManager.save, int(os.environ["FAIL_CHECKPOINT_STEP"])
def save(self, at_step, *args, **kwargs):
  if at_step == step:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  return real(self, at_step, *args, **kwargs)
ocp.CheckpointManager.save = save
from astrollama_jax.commands import start
start("train", ["astrollama_jax train", *sys.argv[1:]])
"""


def test_train_checkpoint_on_a_full_disk_keeps_the_previous_one_and_resumes(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  run = [*SYNTHETIC, "--config.train.num_steps=9"]  # checkpoints at 3, 6, 9
  cmd = train_cmd(workdir, *run)
  proc = subprocess.run(
    [sys.executable, "-c", DRIVER, *cmd[4:]],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**train_env(1), "FAIL_CHECKPOINT_STEP": "6"},
    timeout=240,
  )
  assert proc.returncode == 1, proc.stderr[-4000:]
  ckpt_dir = workdir / "checkpoints"
  assert (
    f"error: disk full: cannot write checkpoint step 6 to {ckpt_dir / '6'}: "
    "no space left on the device" in proc.stderr
  ), proc.stderr[-4000:]
  assert (
    "complete checkpoints kept: [3]; free some space and rerun the same command to resume "
    "from step 3" in proc.stderr
  )
  assert os.listdir(ckpt_dir) == ["3"]  # step 6's temporary folder is gone, step 3 is intact
  loaded = loader.load_model(str(workdir), on_host=True)
  assert loaded.step == 3 and loaded.cfg.dim == 64

  summary = finish(start(cmd, 1, log), log)
  assert summary["resumed_from"] == 3 and summary["final_step"] == 9, tail(log)
  assert loader.load_model(str(workdir), on_host=True).step == 9
