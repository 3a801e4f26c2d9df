"""Links in a corpus's inputs: never followed, every one accounted for in the manifest.

A source folder's links (to a file, to a paper folder, to the folder itself) and a bulk tar's
link and device members are skipped with a reason, counted among the papers seen, and nothing
they point at is read.
"""

from __future__ import annotations

import io
import json
import tarfile

from helpers import MINI_BODY, MINI_PAPER
import pytest
from test_arxiv_bulk import SINGLE, gz

from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.corpus.plan import collect
from astrollama_jax.data.corpus.source_formats import discover

SECRET = SINGLE.replace("We study", "SECRET-MARKER We study")


def _texts(got) -> str:
  return " ".join(r["text"] for recs in got.records.values() for r in recs)


@pytest.fixture()
def linked_source(tmp_path):
  """``src/`` with one real paper and links: to an outside .tex, to an outside paper folder,
  to ``src`` itself and to an outside metadata file."""
  outside = tmp_path / "outside"
  (outside / "paper").mkdir(parents=True)
  (outside / "secret.tex").write_text(SECRET)
  (outside / "paper" / "ms.tex").write_text(SECRET)
  (outside / "meta.jsonl").write_text(json.dumps({"id": "2101.00009", "title": "T"}) + "\n")
  src = tmp_path / "src"
  src.mkdir()
  (src / "2101.00001.gz").write_bytes(gz(SINGLE))
  (src / "2101.00002.tex").symlink_to(outside / "secret.tex")
  (src / "2101.00003").symlink_to(outside / "paper", target_is_directory=True)
  (src / "loop").symlink_to(".", target_is_directory=True)
  (src / "meta.jsonl").symlink_to(outside / "meta.jsonl")
  return src


def test_links_in_a_source_folder_are_skipped_and_accounted_for(linked_source):
  assert len(discover([linked_source])) == 5  # one paper, four links; the loop is not entered
  got = collect(CorpusConfig(sources=[str(linked_source)], progress=False))
  assert "SECRET-MARKER" not in _texts(got)
  assert [p["id"] for p in got.papers] == ["2101.00001"]
  links = {s["source"]: s for s in got.skipped if s["reason"] == "link"}
  names = ("2101.00002.tex", "2101.00003", "loop", "meta.jsonl")
  assert sorted(links) == sorted(str(linked_source / n) for n in names)
  assert "not followed" in links[str(linked_source / "loop")]["detail"]
  assert got.report.papers_seen == 5 and got.report.papers_skipped == {"link": 4}
  assert got.report.jsonl_records_seen == 0


def test_a_link_named_on_the_command_line_is_read(tmp_path):
  """The user named it: that is consent to read what it points at (but not links inside)."""
  (tmp_path / "real").mkdir()
  (tmp_path / "real" / "2101.00001.gz").write_bytes(gz(SINGLE))
  (tmp_path / "real" / "2101.00002.tex").symlink_to(tmp_path / "real" / "2101.00001.gz")
  (tmp_path / "named").symlink_to(tmp_path / "real", target_is_directory=True)
  got = collect(CorpusConfig(sources=[str(tmp_path / "named")], progress=False))
  assert [p["id"] for p in got.papers] == ["2101.00001"]
  assert [(s["id"], s["reason"]) for s in got.skipped] == [("2101.00002", "link")]


def _member(tar, name, kind, data=b"", target=""):
  info = tarfile.TarInfo(name)
  info.type, info.mtime, info.size, info.linkname = kind, 0, len(data), target
  if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
    info.devmajor, info.devminor = 1, 3
  tar.addfile(info, io.BytesIO(data) if data else None)


def test_link_and_device_members_of_a_bulk_tar_are_accounted_for(tmp_path):
  path = tmp_path / "arXiv_src_2101_001.tar"
  with tarfile.open(path, "w") as tar:
    _member(tar, "2101", tarfile.DIRTYPE)
    _member(tar, "2101/2101.00001.gz", tarfile.REGTYPE, gz(SINGLE))
    _member(tar, "2101/2101.00002.gz", tarfile.SYMTYPE, target="/etc/passwd")
    _member(tar, "2101/2101.00003.gz", tarfile.LNKTYPE, target="2101/2101.00001.gz")
    _member(tar, "2101/2101.00004.gz", tarfile.CHRTYPE)
    _member(tar, "2101/2101.00005.gz", tarfile.FIFOTYPE)
  got = collect(CorpusConfig(sources=[str(path)], progress=False))  # the manifest's account
  skipped = {s["id"]: (s["reason"], s["source"], s["detail"]) for s in got.skipped}
  assert {k: v[0] for k, v in skipped.items()} == {
    "2101.00002": "link",
    "2101.00003": "link",
    "2101.00004": "not_a_file",
    "2101.00005": "not_a_file",
  }
  assert skipped["2101.00002"][1] == f"{path}:2101/2101.00002.gz"
  assert "/etc/passwd" in skipped["2101.00002"][2]
  assert "2101/2101.00001.gz" in skipped["2101.00003"][2]
  assert [p["id"] for p in got.papers] == ["2101.00001"]
  assert got.report.papers_seen == 5 and got.report.papers_kept == 1
  assert got.report.papers_skipped == {"link": 2, "not_a_file": 2}


def test_a_paper_folder_of_links_alone_is_not_a_paper(tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "ms.tex").write_text(MINI_PAPER)
  (outside / "body.tex").write_text(MINI_BODY)
  paper = tmp_path / "src" / "2101.00001"
  paper.mkdir(parents=True)
  for name in ("ms.tex", "body.tex"):
    (paper / name).symlink_to(outside / name)
  got = collect(CorpusConfig(sources=[str(tmp_path / "src")], progress=False))
  assert not got.papers
  assert sorted(s["source"] for s in got.skipped) == sorted(
    str(paper / n) for n in ("body.tex", "ms.tex")
  )
