"""The corpus over time: monthly updates as versions, date-bounded training, resumed prepares."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

from helpers import (
  LABELLED_LATEX,
  REPO,
  SINGLE,
  TOKENIZER,
  bulk_tar,
  gz,
  need,
)
import pytest

from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.corpus.build import WORK_DIR, build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.corpus.tfds_builder import AstroCorpus

# ----------------------------------------------------------------------------- updates


def _month(tmp: Path, yymm: str, papers: dict[str, str]) -> Path:
  return bulk_tar(
    tmp / f"arXiv_src_{yymm}_001.tar",
    {f"{yymm}/{pid}.gz": gz(text) for pid, text in papers.items()},
  )


def _records(ds_dir) -> dict:
  out = {}
  for split in corpus.SPLITS:
    try:
      src = corpus.read_split(ds_dir, split)
    except ValueError:
      continue
    for i in range(len(src)):
      r = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in src[i].items()}
      out[(r["id"], r["section"])] = (split, i, r)
  return out


def test_a_new_month_grows_the_corpus_as_a_new_version(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  _month(
    src,
    "2101",
    {
      f"2101.0000{i}" + ("v2" if i == 6 else ""): SINGLE.replace("tiny", f"tiny{i}")
      for i in range(1, 7)
    },
  )
  out = tmp_path / "out"
  config = CorpusConfig(sources=[str(src)], progress=False, validation_fraction=0.3)
  build(config, out)
  v1 = corpus.dataset_dir(out)
  v1_files = {p.name: p.read_bytes() for p in v1.iterdir()}
  before = _records(v1)
  _month(
    src,
    "2102",
    {
      "2101.00002v2": SINGLE.replace("tiny", "revised"),  # a newer version
      "2102.00001": SINGLE.replace("tiny", "february"),
      "2102.00002": SINGLE.replace("tiny", "february2"),
    },
  )
  _month(src, "2103", {"2101.00006v1": SINGLE.replace("tiny", "older")})  # older than the stored v2
  builder, report = build(config, out, update=True)
  v2 = corpus.dataset_dir(out)
  assert v2.name == "1.1.0" and v1.exists() and Path(builder.data_dir) == v2
  assert {p.name: p.read_bytes() for p in v1.iterdir()} == v1_files  # the old version is intact
  assert report.units_already_in_corpus == 1 and report.units_seen == 3
  assert report.papers_seen == 4 and report.papers_kept == 3 and report.papers_replaced == 1
  assert report.papers_skipped == {"already_in_corpus": 1}
  after = _records(v2)
  assert set(after) == set(before) | {("2102.00001", s) for s in corpus.SECTIONS} | {
    ("2102.00002", s) for s in corpus.SECTIONS
  }
  assert "revised" in after[("2101.00002", "abstract")][2]["text"]
  assert after[("2101.00002", "abstract")][2]["version"] == 2
  assert "tiny6" in after[("2101.00006", "abstract")][2]["text"]
  for key in set(before) - {("2101.00002", s) for s in corpus.SECTIONS}:
    assert after[key][2] == before[key][2]
  # unchanged old shards are hard links, not copies
  linked = [p for p in v2.glob("*.array_record-*") if p.stat().st_nlink > 1]
  assert linked
  # the saved indexes agree with the records
  keys = corpus.record_keys(v2)
  assert {k: {c: list(v) for c, v in cols.items()} for k, cols in keys.items()} == {
    k: {c: list(v) for c, v in cols.items()} for k, cols in corpus.compute_record_keys(v2).items()
  }
  for split in corpus.SPLITS:
    for section, idx in corpus.section_index(out, split).items():
      assert all(
        after_rec[2]["section"] == section
        for after_rec in after.values()
        if after_rec[0] == split and after_rec[1] in set(idx.tolist())
      )
  # "everything since February 2021"
  since = corpus.select_records(out, "train", since="2021-02")
  want = sorted(i for s, i, r in after.values() if s == "train" and r["date"] >= "2021-02")
  assert since.tolist() == want and want
  # an update with nothing new leaves the dataset as it is
  _, again = build(config, out, update=True)
  assert corpus.dataset_dir(out) == v2 and again.units_already_in_corpus == 3
  with pytest.raises(ValueError, match="keep its split"):
    build(CorpusConfig(sources=[str(src)], progress=False), out, update=True)


def test_training_reads_everything_since_a_date_as_a_mixture_component(tmp_path):
  from astrollama_jax.data import pipeline
  from astrollama_jax.data.tokenizer import Tokenizer
  from astrollama_jax.train import data as train_data

  tok = need(TOKENIZER)
  src = tmp_path / "src"
  src.mkdir()
  _month(src, "2012", {"2012.00001": SINGLE.replace("tiny", "december")})
  _month(src, "2101", {"2101.00001": SINGLE.replace("tiny", "january")})
  out = tmp_path / "out"
  build(CorpusConfig(sources=[str(src)], progress=False, validation_fraction=0.0), out)
  ds = pipeline.make_lm_dataset(
    str(out),
    "train",
    str(tok),
    mixture={"since:2021-01": 1.0},
    seq_len=1024,
    batch_size=1,
    num_epochs=1,
    shuffle=False,
    process_index=0,
    process_count=1,
    drop_remainder=False,
  )
  text = Tokenizer(str(tok)).decode([int(t) for b in ds for t in b["tokens"][0] if t > 2])
  assert "january" in text and "december" not in text
  # the same through a training config: data.lm.mixture names the component
  from astrollama_jax.train.defaults import base_config

  config = base_config()
  config.data.lm.path, config.data.tokenizer_path = str(out), str(tok)
  config.data.lm.mixture = {"since:2021-01": 1.0}
  config.data.seq_len, config.data.shuffle = 1024, False
  ds = train_data.make_dataset(config, "train", batch_size=1, num_epochs=1)
  text = Tokenizer(str(tok)).decode([int(t) for b in ds for t in b["tokens"][0] if t > 2])
  assert "january" in text and "december" not in text
  with pytest.raises(ValueError, match="no records"):
    pipeline.make_lm_dataset(
      str(out), "train", str(tok), mixture={"since:2030": 1.0}, seq_len=64, batch_size=1
    )


# ----------------------------------------------------------------------------- kill and resume


def _real_bulk(tmp: Path, months: int, per_month: int) -> Path:
  """Monthly tars of the real labelled papers (gzipped single files), a few seconds of work."""
  papers = sorted(
    p
    for p in need(LABELLED_LATEX).iterdir()
    if (p / "ms.tex").exists() and len(list(p.glob("*.tex"))) == 1
  )
  src = tmp / "src"
  src.mkdir()
  for m in range(months):
    yymm = f"21{m + 1:02d}"
    _month(
      src,
      yymm,
      {
        f"{yymm}.{i:05d}": (papers[(m * per_month + i) % len(papers)] / "ms.tex").read_text()
        for i in range(per_month)
      },
    )
  return src


def _tree(path: Path) -> dict:
  return {
    str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


def _prepare(src: Path, out: Path, **kw):
  cmd = [
    sys.executable,
    "-m",
    "astrollama_jax",
    "prepare",
    f"--source={src}",
    f"--output={out}",
    "--validation_fraction=0.2",
  ]
  return subprocess.Popen(
    cmd,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    **kw,
  )


@pytest.mark.timeout(300)
def test_a_killed_prepare_resumes_without_redoing_finished_tars(tmp_path):
  src = _real_bulk(tmp_path, months=5, per_month=24)
  reference = tmp_path / "reference"
  ref = _prepare(src, reference)
  _, err = ref.communicate(timeout=280)
  assert ref.returncode == 0, err[-3000:]

  out = tmp_path / "out"
  proc = _prepare(src, out)
  work = out / WORK_DIR
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not list(work.glob("*.jsonl.gz")):
    time.sleep(0.02)
  assert proc.poll() is None, "prepare finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  finished = len(list(work.glob("*.jsonl.gz")))
  assert 1 <= finished < 5 and not (out / AstroCorpus.name / "1.0.0").exists()

  again = _prepare(src, out)
  stdout, err = again.communicate(timeout=280)
  assert again.returncode == 0, err[-3000:]
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["sources_resumed"] == finished and summary["sources"] == 5
  assert summary["papers_seen"] == 120
  assert _tree(corpus.dataset_dir(out)) == _tree(corpus.dataset_dir(reference))
  assert not work.exists()
