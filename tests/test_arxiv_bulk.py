"""The corpus from arXiv's bulk source tars: layout, accounting, metadata join, updates, resume."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import tarfile
import time

from helpers import LABELLED_LATEX, MINI_BODY, MINI_PAPER, REPO, TOKENIZER, need
import numpy as np
import pytest

from astrollama_jax.data import latex, sources
from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.corpus.build import WORK_DIR, build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.corpus.plan import collect
from astrollama_jax.data.corpus.tfds_builder import AstroCorpus

SINGLE = MINI_PAPER.replace("\\input{body}", MINI_BODY)


def tar_bytes(files: dict[str, bytes | str]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in files.items():
      data = data.encode() if isinstance(data, str) else data
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 0
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def gz(data: bytes | str) -> bytes:
  return gzip.compress(data.encode() if isinstance(data, str) else data, mtime=0)


def bulk_tar(path: Path, members: dict[str, bytes]) -> Path:
  """An arXiv bulk source tar: ``YYMM/`` directory entry, then ``YYMM/ID.gz`` / ``.pdf`` files."""
  with tarfile.open(path, "w") as tar:
    for d in sorted({n.split("/")[0] for n in members}):
      info = tarfile.TarInfo(d)
      info.type, info.mtime = tarfile.DIRTYPE, 0
      tar.addfile(info)
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 0
      tar.addfile(info, io.BytesIO(data))
  return path


def figure(n: int) -> bytes:
  return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()  # incompressible


def month_2101(tmp: Path, fig_bytes: int = 9 << 20) -> Path:
  """Every kind of entry a bulk tar holds."""
  return bulk_tar(
    tmp / "arXiv_src_2101_001.tar",
    {
      # gzipped tar: TeX + a figure bigger than the TeX cap (kept: figures do not count)
      "2101/2101.00001.gz": gz(
        tar_bytes({"ms.tex": MINI_PAPER, "body.tex": MINI_BODY, "fig1.png": figure(fig_bytes)})
      ),
      "2101/2101.00002.gz": gz(SINGLE),  # one gzipped .tex
      "2101/2101.00003.pdf": b"%PDF-1.4\n" + figure(2000),  # no source at all
      "2101/2101.00004v1.gz": gz(SINGLE.replace("We study", "We study old")),
      "2101/2101.00004v2.gz": gz(SINGLE.replace("We study", "We study new")),
      "2101/2101.00005.gz": b"\x1f\x8b junk that is not gzip",  # bad member
      "2101/2101.00006.gz": gz("This paper has been withdrawn by the author due to an error.\n"),
      "2101/2101.00007.gz": gz(b"%PDF-1.5\n" + figure(3000)),  # a gzipped PDF
      "2101/2101.00008.gz": gz(tar_bytes({"fig.eps": b"%!PS-Adobe"})),  # a tar without TeX
      "2101/2101.00009.gz": gz(tar_bytes({"a/ms.tex": SINGLE + "%" + "x" * 9_000_000})),
    },
  )


def month_9901(tmp: Path) -> Path:
  return bulk_tar(tmp / "arXiv_src_9901_001.tar", {"9901/astro-ph9901001.gz": gz(SINGLE)})


def _by_key(collected):
  return {(r["id"], r["section"]): r for recs in collected.records.values() for r in recs}


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bulk")
  month_2101(tmp)
  month_9901(tmp)
  got = collect(CorpusConfig(sources=[str(tmp)], progress=False, validation_fraction=0.0))
  return tmp, got


def test_every_member_kind_of_a_bulk_tar(bulk):
  tmp, got = bulk
  recs = _by_key(got)
  assert {i for i, _ in recs} == {"2101.00001", "2101.00002", "2101.00004", "astro-ph/9901001"}
  assert (
    recs[("2101.00001", "introduction")]["text"]
    == "Galaxies are big (see Section). Some are small."
  )
  assert "study new tiny" in recs[("2101.00004", "abstract")]["text"]
  assert recs[("astro-ph/9901001", "conclusion")]["date"] == "1999-01-01"  # from the id
  assert recs[("2101.00002", "abstract")]["version"] == 0
  assert recs[("2101.00004", "abstract")]["version"] == 2
  reasons = {s["id"]: s["reason"] for s in got.skipped}
  assert reasons == {
    "2101.00003": "pdf_only",
    "2101.00004": "older_version",
    "2101.00005": "bad_archive",
    "2101.00006": "withdrawn",
    "2101.00007": "pdf_only",
    "2101.00008": "no_tex",
    "2101.00009": "too_large",
  }
  src = {s["id"]: s["source"] for s in got.skipped}
  assert src["2101.00003"] == f"{tmp / 'arXiv_src_2101_001.tar'}:2101/2101.00003.pdf"
  report = got.report
  assert report.papers_seen == 11 and report.papers_kept == 4 and report.units_seen == 2
  assert report.papers_skipped == {
    "pdf_only": 2,
    "older_version": 1,
    "bad_archive": 1,
    "withdrawn": 1,
    "no_tex": 1,
    "too_large": 1,
  }
  table = report.table()
  assert re.search(r"papers seen \(every source entry\) +11\n", table)
  assert re.search(r"LaTeX papers kept +4  \(36.4%; the reference recipe keeps ~90%\)", table)
  assert re.search(r"skipped: pdf_only +2  \(18.2%\)", table)


def test_an_extracted_month_folder_reads_like_its_tar(bulk, tmp_path):
  tmp, got = bulk
  with tarfile.open(tmp / "arXiv_src_2101_001.tar") as tar:
    tar.extractall(tmp_path, filter="data")
  folder = collect(
    CorpusConfig(sources=[str(tmp_path / "2101")], progress=False, validation_fraction=0.0)
  )
  from_tar = {k: v for k, v in _by_key(got).items() if k[0] != "astro-ph/9901001"}
  assert _by_key(folder) == from_tar
  assert sorted((s["id"], s["reason"]) for s in folder.skipped) == sorted(
    (s["id"], s["reason"]) for s in got.skipped
  )


def test_a_bulk_that_keeps_nothing_is_an_error_not_an_empty_dataset(tmp_path):
  bulk_tar(
    tmp_path / "arXiv_src_2101_001.tar",
    {"2101/2101.00003.pdf": b"%PDF-1.4\n", "2101/2101.00005.gz": b"\x1f\x8b junk"},
  )
  with pytest.raises(
    ValueError,
    match=r"no record to write: 2 entries seen, 0 kept "
    r"\(skipped: bad_archive 1, pdf_only 1\)",
  ):
    build(CorpusConfig(sources=[str(tmp_path)], progress=False), tmp_path / "out")
  assert not (tmp_path / "out" / AstroCorpus.name).exists()


def test_tex_cap_counts_tex_only_and_content_decides_the_kind(tmp_path):
  big_fig = gz(tar_bytes({"ms.tex": SINGLE, "big.png": figure(3 << 20)}))
  for name in ("2101.00001.gz", "2101.00001.tar.gz", "2101.00001.tgz"):  # same bytes, any name
    (tmp_path / name).write_bytes(big_fig)
    paper = latex.process_paper(tmp_path / name, max_bytes=1 << 20)
    assert set(paper.sections) == {"abstract", "introduction", "conclusion"}, name
  (tmp_path / "x.tar.gz").write_bytes(gz(SINGLE))  # named a tarball, is one file: still read
  assert latex.process_paper(tmp_path / "x.tar.gz").sections
  (tmp_path / "t.gz").write_bytes(gz(tar_bytes({"ms.tex": "x" * (1 << 20) + SINGLE})))
  assert latex.process_paper(tmp_path / "t.gz", max_bytes=1 << 20).reason == "too_large"


def test_a_member_is_read_in_place_without_extracting(tmp_path):
  tar = month_9901(tmp_path)
  entries, error = sources.bulk_entries(tar)
  assert error == "" and [e.member for e in entries] == ["9901/astro-ph9901001.gz"]
  assert entries[0].id_version == ("astro-ph/9901001", 0)
  assert sources.read_entry(entries[0]) == {"astro-ph9901001.tex": SINGLE}
  assert sources.is_bulk_tar(tar)
  renamed = tmp_path / "january.tar"  # recognised by its members too
  renamed.write_bytes(tar.read_bytes())
  assert sources.is_bulk_tar(renamed)
  single = tmp_path / "2101.00001.tar"
  single.write_bytes(tar_bytes({"ms.tex": SINGLE}))
  assert not sources.is_bulk_tar(single)
  cut = tmp_path / "arXiv_src_2101_002.tar"  # a truncated download
  data = month_2101(tmp_path, fig_bytes=4096).read_bytes()
  cut.write_bytes(data[: len(data) // 2 + 100])
  entries, error = sources.bulk_entries(cut)
  assert entries and error


def _meta(
  pid,
  cats="astro-ph.GA",
  lic="http://creativecommons.org/licenses/by/4.0/",
  versions=1,
  created="Mon, 4 Jan 2021 10:00:00 GMT",
  **extra,
):
  return {
    "id": pid,
    "submitter": "A. Person",
    "authors": "A. Person",
    "title": f"Title {pid}",
    "comments": "10 pages",
    "journal-ref": None,
    "doi": None,
    "report-no": None,
    "categories": cats,
    "license": lic,
    "abstract": f"  Abstract of {pid}.\n",
    "versions": [{"version": f"v{i + 1}", "created": created} for i in range(versions)],
    "update_date": "2021-02-01",
    "authors_parsed": [["Person", "A.", ""]],
  } | extra


def _snapshot(path: Path) -> Path:
  lines = [
    json.dumps(_meta("2101.00001")),
    json.dumps(_meta("2101.00002", lic="http://arxiv.org/licenses/nonexclusive-distrib/1.0/")),
    json.dumps(_meta("2101.00004", versions=2)),
    json.dumps(_meta("2101.00010", cats="hep-th")),
    json.dumps(_meta("2101.00011", comments="This paper has been withdrawn by the author")),
    json.dumps(_meta("astro-ph/9901001", lic=None, created="Fri, 1 Jan 1999 10:00:00 GMT")),
    json.dumps(_meta("2012.00012", created="Tue, 1 Dec 2020 10:00:00 GMT")),
    '{"id": "2101.00013", "title": "bad \\ud800 text", "categories": "astro-ph.CO"}',
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


def test_metadata_join_licences_dates_and_a_lone_surrogate(tmp_path):
  month_2101(tmp_path, fig_bytes=4096)
  month_9901(tmp_path)
  snap = _snapshot(tmp_path / "arxiv-metadata-oai-snapshot.json")
  got = collect(CorpusConfig(sources=[str(tmp_path)], progress=False, validation_fraction=0.0))
  recs = _by_key(got)
  assert recs[("2101.00001", "abstract")]["text"] == "Abstract of 2101.00001."  # arXiv's own text
  assert recs[("2101.00001", "introduction")]["license"].endswith("/by/4.0/")
  assert recs[("2101.00001", "introduction")]["date"] == "2021-01-04"
  assert recs[("2101.00004", "abstract")]["version"] == 2
  assert ("2101.00011", "abstract") not in recs and ("2101.00010", "abstract") not in recs
  assert got.report.jsonl_skipped == {"bad_unicode": 1, "category": 1, "withdrawn": 1}
  assert got.report.jsonl_records_seen == 7 and got.report.latex_abstracts_replaced == 4
  assert all("license" in r for r in recs.values())

  cc = collect(
    CorpusConfig(
      sources=[str(tmp_path)],
      progress=False,
      validation_fraction=0.0,
      licenses=("redistributable",),
    )
  )
  ids = {i for i, _ in _by_key(cc)}
  assert ids == {"2101.00001", "2101.00004", "2012.00012"}
  why = {s["id"]: s["reason"] for s in cc.skipped}
  assert why["2101.00002"] == "license" and why["astro-ph/9901001"] == "license"

  recent = collect(
    CorpusConfig(
      sources=[str(tmp_path), str(snap)],
      progress=False,
      validation_fraction=0.0,
      since="2021-01",
      until="2021-01-31",
    )
  )
  assert {i for i, _ in _by_key(recent)} == {"2101.00001", "2101.00002", "2101.00004"}
  assert {s["id"]: s["reason"] for s in recent.skipped}["astro-ph/9901001"] == "date_range"
  for bad in ("2024-13", "24-01", "2024/01/01"):
    with pytest.raises(ValueError, match="is not a date"):
      collect(CorpusConfig(sources=[str(snap)], since=bad, progress=False))


def test_no_symlink_is_followed_in_a_paper_folder(tmp_path):
  secret = tmp_path / "secret.txt"
  secret.write_text("root:x:0:0:SECRET-MARKER\n")
  paper = tmp_path / "src" / "2101.00001"
  paper.mkdir(parents=True)
  (paper / "ms.tex").write_text(MINI_PAPER.replace("\\input{body}", "\\input{evil}\n\\input{body}"))
  (paper / "body.tex").write_text(MINI_BODY)
  (paper / "evil.tex").symlink_to(secret)
  (paper / "sub").symlink_to(tmp_path, target_is_directory=True)
  if Path("/etc/passwd").exists():
    (paper / "passwd.tex").symlink_to("/etc/passwd")
  got = collect(CorpusConfig(sources=[str(tmp_path / "src")], progress=False))
  texts = " ".join(r["text"] for recs in got.records.values() for r in recs)
  assert "SECRET-MARKER" not in texts and "root:" not in texts
  (kept,) = got.papers
  assert kept["missing_inputs"] == ["evil"]
  assert sources.read_bundle(paper).keys() == {"ms.tex", "body.tex"}


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
