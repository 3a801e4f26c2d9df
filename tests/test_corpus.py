"""The TFDS corpus builder, its manifest, and the prepare entry point."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from array_record.python.array_record_data_source import ArrayRecordDataSource
from helpers import (
  DEMO_CORPUS,
  MINI_BODY,
  MINI_PAPER,
  REPO,
  abstracts_subset,
  write_gz,
  write_jsonl,
  write_tar_gz,
)
import numpy as np
import pytest

from astrollama_jax.data.corpus import indexes
from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.corpus.build import build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.corpus.plan import collect, split_of
from astrollama_jax.data.corpus.source_formats import discover


def _raw_records(ds_dir):
  out = {}
  for path in sorted(glob.glob(os.path.join(ds_dir, "*.array_record-*"))):
    src = ArrayRecordDataSource([path])
    out[os.path.basename(path)] = [src[i] for i in range(len(src))]
  return out


def _decode(rec):
  return {k: v.decode() if isinstance(v, bytes) else v for k, v in rec.items()}


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo_corpus_out")
  config = CorpusConfig(sources=[str(DEMO_CORPUS)], validation_fraction=0.15, progress=False)
  builder, report = build(config, out)
  return builder, report, out


def test_demo_corpus_records(demo_build):
  builder, report, _ = demo_build
  assert report.papers_seen == 4 and report.papers_kept == 4
  assert report.sections_found == {"abstract": 4, "introduction": 4, "conclusion": 4}
  assert report.jsonl_skipped["category"] == 1  # the physics.ed-ph record
  train = [_decode(r) for r in builder.as_data_source("train")]
  val = [_decode(r) for r in builder.as_data_source("validation")]
  assert len(train) + len(val) == 41 + 4 * 3
  keys = [(r["id"], r["section"]) for r in train + val]
  assert len(set(keys)) == len(keys), "one record per (id, section)"
  assert not {r["id"] for r in train} & {r["id"] for r in val}, "a paper lives in one split"
  assert {r["section"] for r in train + val} == {"abstract", "introduction", "conclusion"}
  by_key = {(r["id"], r["section"]): r for r in train + val}
  aa = by_key[("demo.1003", "abstract")]
  assert (
    aa["title"] == "Dust trapping in a ringed protoplanetary disc" and aa["date"] == "2024-05-03"
  )
  assert aa["text"].startswith("Many protoplanetary discs") and "$10^{-4}$" in aa["text"]
  assert by_key[("demo.1004", "introduction")]["title"].startswith("A Simple Estimate")
  assert by_key[("demo.1002", "conclusion")]["text"].endswith("as stars spin down.")
  assert "demo.0900" not in {r["id"] for r in train + val}


def test_manifest_and_section_index(demo_build):
  builder, _, _ = demo_build
  ds_dir = builder.data_dir
  manifest = json.loads(open(os.path.join(ds_dir, corpus.MANIFEST)).read())
  assert manifest["report"]["retention"] == 1.0
  spans = {p["id"]: p["sections"] for p in manifest["papers"]}
  (span,) = spans["demo.1002"]["introduction"]["spans"]
  assert span["file"] == "sections/intro.tex" and span["start"] < span["end"]
  index = corpus.section_index(ds_dir, "train")
  src = builder.as_data_source("train")
  for section, idx in index.items():
    assert all(_decode(src[int(i)])["section"] == section for i in idx)
  assert sum(len(v) for v in index.values()) == len(src)


def _same_keys(a, b):
  assert sorted(a) == sorted(b)
  for split in a:
    assert sorted(a[split]) == sorted(b[split])
    for k in a[split]:
      assert a[split][k].tolist() == b[split][k].tolist(), (split, k)


def test_indexes_written_with_the_records_match_a_pass_over_them(demo_build):
  """The record keys and section index are computed as the records are generated (no second
  pass): they must be what reading every record back gives."""
  builder, _, _ = demo_build
  ds_dir = builder.data_dir
  _same_keys(corpus.record_keys(ds_dir), corpus.compute_record_keys(ds_dir))
  saved = dict(np.load(os.path.join(ds_dir, corpus.SECTION_INDEX)))
  again = corpus.compute_section_index(ds_dir)
  assert sorted(saved) == sorted(again)
  assert all(saved[k].tolist() == again[k].tolist() for k in saved)


def test_indexes_fall_back_to_reading_back_when_the_order_is_not_tfds(demo_build, monkeypatch):
  builder, _, _ = demo_build
  ds_dir = builder.data_dir
  keys = corpus.compute_record_keys(ds_dir)
  written = {
    split: [
      (f"{i}/{s}", i, s, int(v), d)
      for i, s, v, d in zip(cols["id"], cols["section"], cols["version"], cols["date"])
    ]
    for split, cols in keys.items()
  }
  _same_keys(indexes.written_record_keys(ds_dir, written), keys)
  # another salt: another order, caught by the records read back
  real = indexes.hashing.Hasher
  monkeypatch.setattr(indexes.hashing, "Hasher", lambda salt: real(f"other {salt}"))
  calls = []
  monkeypatch.setattr(indexes, "compute_record_keys", lambda d: calls.append(d) or keys)
  assert indexes.written_record_keys(ds_dir, written) is keys and calls == [ds_dir]


def test_split_is_a_function_of_the_id():
  assert split_of("2504.11526", 0.0) == "train"
  assert split_of("2504.11526", 0.999999) == "validation"
  ids = [f"2501.{i:05d}" for i in range(2000)]
  frac = sum(split_of(i, 0.1) == "validation" for i in ids) / len(ids)
  assert 0.07 < frac < 0.13


def test_dedup_versions_categories_and_skips(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  write_gz(src / "2101.00001v1.gz", MINI_PAPER.replace("\\input{body}", ""))
  write_tar_gz(src / "2101.00001v2.tar.gz", {"ms.tex": MINI_PAPER, "body.tex": MINI_BODY})
  write_gz(src / "2101.00002.gz", MINI_PAPER)  # not astro-ph per the metadata below
  (src / "2101.00003.tex").write_text("\\documentclass{x}\\begin{document}\\emph{\\end{document}")
  (src / "2101.00004.gz").write_bytes(b"\x1f\x8bjunk")
  write_jsonl(
    src / "meta.jsonl",
    [  # public-snapshot style: categories as a string
      {
        "id": "2101.00001",
        "title": "Old",
        "abstract": "Old abstract.",
        "categories": "astro-ph.GA",
        "update_date": "2021-01-01",
      },
      {
        "id": "2101.00001v3",
        "title": "New",
        "abstract": "New abstract.",
        "categories": "astro-ph.GA hep-ph",
        "update_date": "2021-02-01",
      },
      {
        "id": "2101.00002",
        "title": "Particles",
        "abstract": "Not astro.",
        "categories": "hep-th",
        "update_date": "2021-01-01",
      },
    ],
  )
  got = collect(CorpusConfig(sources=[str(src)], progress=False, validation_fraction=0.0))
  recs = {(r["id"], r["section"]): r for r in got.records["train"]}
  assert set(recs) == {
    ("2101.00001", "abstract"),
    ("2101.00001", "introduction"),
    ("2101.00001", "conclusion"),
  }
  assert recs[("2101.00001", "abstract")]["text"] == "New abstract."  # JSONL beats LaTeX
  assert recs[("2101.00001", "introduction")]["title"] == "New"
  reasons = sorted((s["id"], s["reason"]) for s in got.skipped)
  assert reasons == [
    ("2101.00001", "older_version"),
    ("2101.00002", "category"),
    ("2101.00003", "unbalanced_braces"),
    ("2101.00004", "bad_archive"),
  ]
  assert got.report.papers_seen == 5 and got.report.papers_kept == 1
  assert got.report.jsonl_skipped == {"duplicate_id": 1, "category": 1}
  assert "skipped: unbalanced_braces" in got.report.table()


def test_bad_sources_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    discover([tmp_path / "nope"])
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    discover([tmp_path / "empty.jsonl"])
  (tmp_path / "dir").mkdir()
  with pytest.raises(ValueError, match="holds no .jsonl"):
    discover([tmp_path / "dir"])
  (tmp_path / "bad.jsonl").write_text('{"id": "1"}\nnot json\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    collect(CorpusConfig(sources=[str(tmp_path / "bad.jsonl")], progress=False))


@pytest.mark.timeout(180)
def test_prepare_cli_is_deterministic_with_workers(tmp_path):
  """Two runs (2 worker processes) on the same input write byte-identical records."""
  subset = abstracts_subset(tmp_path, 300)
  outs = []
  for run in ("a", "b"):
    out = tmp_path / run
    cmd = [
      sys.executable,
      "-m",
      "astrollama_jax",
      "prepare",
      f"--source={DEMO_CORPUS},{subset}",
      f"--output={out}",
      "--workers=2",
      "--validation_fraction=0.1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LaTeX papers kept" in proc.stdout and "records train" in proc.stdout
    outs.append(_raw_records(corpus.dataset_dir(out)))
  assert outs[0] == outs[1]
  n = sum(len(v) for v in outs[0].values())
  assert n == 300 + 41 + 12
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "prepare",
      f"--source={tmp_path}/missing.jsonl",
      f"--output={tmp_path}/c",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=60,
  )
  assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_records_past_the_shuffle_buffer_spill_to_disk_without_tensorflow(
  tmp_path, monkeypatch, demo_build
):
  """A corpus larger than TFDS's in-memory shuffle buffer (every real one) is written the same."""
  from tensorflow_datasets.core import shuffle

  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 2000)  # the demo's records spill
  config = CorpusConfig(sources=[str(DEMO_CORPUS)], validation_fraction=0.15, progress=False)
  builder, _ = build(config, tmp_path / "spilled")
  _, _, out = demo_build
  assert _raw_records(builder.data_dir) == _raw_records(corpus.dataset_dir(out))
  _same_keys(corpus.record_keys(builder.data_dir), corpus.compute_record_keys(builder.data_dir))


def test_text_source_reads_the_records_texts_in_order(demo_build):
  import pickle

  builder, _, out = demo_build
  for split in ("train", "validation"):
    full = corpus.read_split(out, split)
    texts = corpus.TextSource(out, split)
    assert len(texts) == len(full) > 0
    assert [texts[i]["text"] for i in range(len(texts))] == [
      full[i]["text"] for i in range(len(full))
    ]
    again = pickle.loads(pickle.dumps(texts))  # what a Grain worker gets
    assert again[len(again) - 1] == texts[len(texts) - 1]
  with pytest.raises(ValueError, match="split 'test' not in"):
    corpus.TextSource(builder.data_dir, "test")
