"""The corpus from arXiv's bulk source tars: layout, accounting, the metadata join."""

from __future__ import annotations

import json
from pathlib import Path
import re
import tarfile

from helpers import (
  MINI_BODY,
  MINI_PAPER,
  SINGLE,
  bulk_tar,
  gz,
  tar_bytes,
)
import numpy as np
import pytest

from astrollama_jax.data import latex, sources
from astrollama_jax.data.corpus.build import build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.corpus.plan import collect
from astrollama_jax.data.corpus.tfds_builder import AstroCorpus


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
