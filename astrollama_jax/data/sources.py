"""Read arXiv inputs as distributed: bulk source tars, LaTeX bundles and metadata JSON lines.

A LaTeX *bundle* is what arXiv serves for one paper: a gzipped single ``.tex``
(``<id>.gz``), a gzipped tar of the submission (also named ``<id>.gz``), a tarball, a plain
``.tex``, a folder, or a PDF for a paper without source. The kind is recognised by content,
not by name. ``read_bundle`` returns its TeX files as ``{relative path: text}`` or raises
``ParseError`` with a manifest reason; only TeX text counts toward ``max_bytes`` (figures are
passed over, never kept), so a huge or hostile archive cannot exhaust memory.

arXiv's bulk tars (``arXiv_src_YYMM_NNN.tar``) hold ``YYMM/ID.gz`` and ``YYMM/ID.pdf`` members.
``bulk_entries`` lists them from the tar headers alone; ``read_entry`` reads one member in place
(by offset, without extracting anything to disk), so worker processes can share one tar.

Links are never followed: a link among the sources (``link_entry``) or a link or device member
of a bulk tar becomes an entry that is skipped with its reason (``link``, ``not_a_file``), so
the manifest accounts for it and nothing it points at is read.

Which of these readers reads which input is one table: ``SOURCE_FORMATS`` in
``data/corpus/source_formats.py``.
"""

from __future__ import annotations

import collections
from collections.abc import Container, Iterator
import dataclasses
from email.utils import parsedate_to_datetime
import gzip
import io
import json
import os
from pathlib import Path
import re
import tarfile
import zlib

from astrollama_jax.data.latex_sections import ParseError

DEFAULT_MAX_BYTES = 8 << 20
TEX_SUFFIXES = (".tex", ".ltx", ".latex")
BUNDLE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gz", ".tex", ".pdf")
_BULK_NAME_RE = re.compile(r"^arXiv_src_\d{4}_\d+\.tar$")
_BULK_MEMBER_RE = re.compile(r"^\d{4}/[^/]+\.(gz|pdf)$")
_VERSION_RE = re.compile(r"v\d+$")
_OLD_ID_RE = re.compile(r"^([a-z-]+(?:\.[A-Z]{2})?)(\d{7})$")
_INPUTENC_RE = re.compile(rb"\\usepackage\[([A-Za-z0-9,-]{1,40})\]\{inputenc\}")
_LATIN = {
  b"latin1": "latin-1",
  b"latin9": "iso8859-15",
  b"ansinew": "cp1252",
  b"cp1252": "cp1252",
  b"applemac": "mac_roman",
}


def paper_id_from_path(path: str | os.PathLike) -> tuple[str, int]:
  """arXiv id and version from a file name: ``2504.11526v2.tar.gz`` -> ("2504.11526", 2).

  Old-style names without the slash (``astro-ph0605151``) get it back. A name without a
  version suffix ranks as version 0.
  """
  name = Path(path).name
  for suf in BUNDLE_SUFFIXES:
    if name.endswith(suf):
      name = name[: -len(suf)]
      break
  version = 0
  m = _VERSION_RE.search(name)
  if m and name[: m.start()]:
    version, name = int(m.group()[1:]), name[: m.start()]
  old = _OLD_ID_RE.match(name)
  if old:
    name = f"{old.group(1)}/{old.group(2)}"
  return name, version


def strip_version(arxiv_id: str) -> str:
  m = _VERSION_RE.search(arxiv_id)
  return arxiv_id[: m.start()] if m and arxiv_id[: m.start()] else arxiv_id


def is_bundle(path: Path) -> bool:
  """True for a file that looks like one paper's source, or a folder holding .tex files."""
  if path.is_dir():  # a paper folder has .tex files and no archives or JSONL beside them
    names = [p.name.lower() for p in path.iterdir() if p.is_file() and not p.is_symlink()]
    return any(n.endswith(TEX_SUFFIXES) for n in names) and not any(
      n.endswith((".gz", ".tgz", ".tar", ".jsonl")) for n in names
    )
  return path.name.lower().endswith(BUNDLE_SUFFIXES)


def decode_tex(data: bytes, name: str) -> str:
  """UTF-8, or the 8-bit encoding that ``inputenc`` declares; else ParseError('encoding')."""
  if b"\x00" in data[:65536]:
    raise ParseError("binary", f"{name} contains NUL bytes")
  sample = data[:65536]
  ctrl = sum(1 for b in sample if b < 32 and b not in (9, 10, 12, 13))
  if sample and ctrl / len(sample) > 0.01:
    raise ParseError("binary", f"{name} is {ctrl / len(sample):.0%} control characters")
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    m = _INPUTENC_RE.search(data)
    if m:
      for opt in m.group(1).split(b","):
        if opt in _LATIN:
          return data.decode(_LATIN[opt])
    raise ParseError(
      "encoding",
      f"{name} is not UTF-8 ({e.reason} at byte {e.start}) and declares no 8-bit inputenc",
    ) from None


def _member_name(name: str) -> str:
  return os.path.normpath(name).replace(os.sep, "/").lstrip("./")


def _read_tar(fileobj, max_bytes: int, label: str) -> dict[str, str]:
  """TeX members of a tar read as a stream (``fileobj`` is never seeked): figures and other
  files are passed over without being kept, and only TeX text counts toward ``max_bytes``."""
  files: dict[str, str] = {}
  total = 0
  try:
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
      for member in tar:  # links and devices are not files: never followed
        if not member.isfile() or not member.name.lower().endswith(TEX_SUFFIXES):
          continue
        total += member.size
        if total > max_bytes:
          raise ParseError("too_large", f"{label}: TeX files exceed {max_bytes} bytes")
        f = tar.extractfile(member)
        if f is not None:
          files[_member_name(member.name)] = decode_tex(f.read(), f"{label}:{member.name}")
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise ParseError("bad_archive", f"{label}: {e}") from None
  return files


def looks_like_tar(header: bytes) -> bool:
  """Whether ``header`` is a valid tar header block (its checksum adds up)."""
  if len(header) < tarfile.BLOCKSIZE:
    return False
  try:
    tarfile.TarInfo.frombuf(header[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
  except tarfile.HeaderError:
    return False
  return True


def _single_name(name: str) -> str:
  base = Path(name).name
  base = base.removesuffix(".gz")
  return base if base.lower().endswith(TEX_SUFFIXES) else base + ".tex"


def _read_payload(f, name: str, max_bytes: int, label: str) -> dict[str, str]:
  """One paper's source from a seekable binary file, recognised by content, not by name:
  gzip (of a tar or of one file), tar, PDF, or a single TeX file."""
  head = f.read(tarfile.BLOCKSIZE)
  if not head:
    raise ParseError("empty", f"{label} is empty")
  f.seek(0)
  if head[:2] == b"\x1f\x8b":
    gz = gzip.GzipFile(fileobj=f, mode="rb")
    try:
      inner = gz.read(tarfile.BLOCKSIZE)  # only the header is inflated to decide
    except (OSError, EOFError, zlib.error) as e:
      raise ParseError("bad_archive", f"{label}: {e}") from None
    if looks_like_tar(inner):
      f.seek(0)
      return _read_tar(gzip.GzipFile(fileobj=f, mode="rb"), max_bytes, label)
    if inner.startswith(b"%PDF"):
      raise ParseError("pdf_only", f"{label} is a gzipped PDF")
    try:
      data = inner + gz.read(max_bytes + 1 - len(inner))
    except (OSError, EOFError, zlib.error) as e:
      raise ParseError("bad_archive", f"{label}: {e}") from None
    if len(data) > max_bytes:
      raise ParseError("too_large", f"{label} decompresses to more than {max_bytes} bytes")
  elif looks_like_tar(head):
    return _read_tar(f, max_bytes, label)
  elif head.startswith(b"%PDF"):
    raise ParseError("pdf_only", f"{label} is a PDF (no source)")
  else:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
      raise ParseError("too_large", f"{label} is larger than {max_bytes} bytes")
  if data.lstrip().startswith(b"%!PS"):
    raise ParseError("no_tex", f"{label} is PostScript")
  return {_single_name(name): decode_tex(data, label)}


def _read_folder(path: Path, max_bytes: int, label: str) -> dict[str, str]:
  """TeX files under a paper folder; symbolic links (to files or folders) are not followed,
  so a link such as ``x.tex -> /etc/passwd`` cannot pull an outside file into the corpus."""
  files: dict[str, str] = {}
  total = 0
  for root, dirs, names in os.walk(path, followlinks=False):
    dirs.sort()
    for name in sorted(names):
      p = Path(root) / name
      if p.is_symlink() or not name.lower().endswith(TEX_SUFFIXES) or not p.is_file():
        continue
      total += p.stat().st_size
      if total > max_bytes:
        raise ParseError("too_large", f"{label}: TeX files exceed {max_bytes} bytes")
      files[p.relative_to(path).as_posix()] = decode_tex(p.read_bytes(), str(p))
  return dict(sorted(files.items()))


def read_bundle(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, str]:
  """All TeX files of one paper's source, keyed by path relative to the bundle root."""
  path = Path(path)
  label = str(path)
  if not path.exists():
    raise ParseError("missing", f"{label} does not exist")
  if path.is_dir():
    files = _read_folder(path, max_bytes, label)
  else:
    with open(path, "rb") as f:
      files = _read_payload(f, path.name, max_bytes, label)
  if not files:
    raise ParseError("no_tex", f"{label} holds no .tex file")
  return files


# ----------------------------------------------------------------------------- bulk tars


class _Window(io.RawIOBase):
  """Bytes ``[offset, offset + size)`` of an open file, as a seekable file of their own."""

  def __init__(self, f, offset: int, size: int):
    self._f, self._offset, self._size, self._pos = f, offset, size, 0

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
    self._pos = min(max(base + pos, 0), self._size)
    return self._pos

  def readinto(self, b) -> int:
    n = min(len(b), self._size - self._pos)
    if n <= 0:
      return 0
    self._f.seek(self._offset + self._pos)
    data = self._f.read(n)
    b[: len(data)] = data
    self._pos += len(data)
    return len(data)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One paper's source: a file or folder (``member`` empty), or a member of a bulk tar, found
  by its data's ``offset`` and ``size`` in that tar so a worker reads it without a tar scan."""

  path: str
  member: str = ""
  offset: int = 0
  size: int = 0
  skip: tuple[str, ...] = ()  # (reason, detail): listed to be accounted for, never read

  @property
  def label(self) -> str:
    return f"{self.path}:{self.member}" if self.member else self.path

  @property
  def id_version(self) -> tuple[str, int]:
    return paper_id_from_path(self.member or self.path)


def link_entry(path: str | os.PathLike) -> Entry:
  """A symbolic link found among the sources, as an entry skipped (not followed) when read."""
  return Entry(str(path), skip=("link", f"symbolic link to {os.readlink(path)!r}, not followed"))


_NOT_FILES = {
  tarfile.CHRTYPE: "character device",
  tarfile.BLKTYPE: "block device",
  tarfile.FIFOTYPE: "FIFO",
}


def _skipped_member(path: str, member: tarfile.TarInfo) -> Entry:
  """A bulk tar member that is neither a file nor a folder, as an entry skipped when read."""
  if member.issym() or member.islnk():
    kind = "symbolic" if member.issym() else "hard"
    skip = ("link", f"{kind} link to {member.linkname!r}, not followed")
  else:
    what = _NOT_FILES.get(member.type, f"member of tar type {member.type!r}")
    skip = ("not_a_file", f"a {what}, not a file")
  return Entry(path, member.name, member.offset_data, 0, skip)


def is_bulk_tar(path: str | os.PathLike) -> bool:
  """An arXiv bulk source tar (``arXiv_src_YYMM_NNN.tar``): by name, or a ``.tar`` whose first
  file is a ``YYMM/ID.gz`` or ``YYMM/ID.pdf`` member."""
  path = Path(path)
  if not path.is_file() or not path.name.endswith(".tar"):
    return False
  if _BULK_NAME_RE.match(path.name):
    return True
  try:
    with tarfile.open(path, "r:") as tar:
      for member in tar:
        if member.isfile():
          return bool(_BULK_MEMBER_RE.match(member.name))
  except (tarfile.TarError, OSError):
    return False
  return False


def bulk_entries(path: str | os.PathLike) -> tuple[list[Entry], str]:
  """The members of a bulk tar but its folders, read from its headers alone (data is seeked
  over), and an error message if the tar is cut short or corrupt ("" if it reads to its end).
  Links and devices are listed as entries skipped when read (see the module docstring)."""
  entries: list[Entry] = []
  try:
    with tarfile.open(path, "r:") as tar:
      while True:
        member = tar.next()
        if member is None:
          break
        if member.isfile():
          entries.append(Entry(str(path), member.name, member.offset_data, member.size))
        elif not member.isdir():
          entries.append(_skipped_member(str(path), member))
        tar.members = []  # headers are not kept: memory stays flat in the tar's size
  except (tarfile.TarError, OSError, EOFError) as e:
    return entries, f"{path}: {e}"
  return entries, ""


def read_entry(entry: Entry, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, str]:
  """The TeX files of one entry (see ``read_bundle``), streamed out of its bulk tar if any."""
  if entry.skip:
    raise ParseError(*entry.skip)
  if not entry.member:
    return read_bundle(entry.path, max_bytes)
  if entry.member.lower().endswith(".pdf"):  # arXiv lists papers without source as PDFs
    raise ParseError("pdf_only", f"{entry.label}: PDF only, no source")
  with open(entry.path, "rb") as f:
    window = io.BufferedReader(_Window(f, entry.offset, entry.size), 1 << 16)
    files = _read_payload(window, entry.member, max_bytes, entry.label)
  if not files:
    raise ParseError("no_tex", f"{entry.label} holds no .tex file")
  return files


# ----------------------------------------------------------------------------- JSON lines


_WITHDRAWN_RE = re.compile(
  r"\b(?:has been|have been|is|was|were) withdrawn\b|\bwithdrawn by\b|"
  r"^\s*withdrawn\b",
  re.IGNORECASE,
)


def is_withdrawal_notice(text: str) -> bool:
  """Whether ``text`` (metadata comments, or a short source) says the paper is withdrawn."""
  return bool(_WITHDRAWN_RE.search(text or ""))


def _version_number(value: str) -> int:
  m = _VERSION_RE.search(str(value).strip())
  return int(m.group()[1:]) if m else 0


def _first_version_date(versions) -> str:
  """``versions[0]["created"]`` ("Mon, 2 Apr 2007 19:18:42 GMT") as YYYY-MM-DD, or ""."""
  try:
    return parsedate_to_datetime(versions[0]["created"]).strftime("%Y-%m-%d")
  except (TypeError, ValueError, KeyError, IndexError, AttributeError):
    return ""


_TEXT_FIELDS = ("title", "abstract", "date", "update_date", "license", "comments")


def field_problem(rec: dict) -> str | None:
  """What makes ``rec`` not a metadata record (a field of the wrong JSON type), or None."""
  if not isinstance(rec.get("id"), str) or not rec["id"].strip():
    return "id"
  for key in _TEXT_FIELDS:
    if rec.get(key) is not None and not isinstance(rec[key], str):
      return key
  cats = rec.get("categories")
  if cats is not None and not (
    isinstance(cats, str) or (isinstance(cats, list) and all(isinstance(c, str) for c in cats))
  ):
    return "categories"
  versions = rec.get("versions")
  if versions is not None and not isinstance(versions, list):
    return "versions"
  return None


def normalise_record(rec: dict) -> dict:
  """One metadata/abstract record (``field_problem`` None) as id, version, title, abstract,
  categories (list), date (first submission when ``versions`` says, else
  ``date``/``update_date``), updated, license, withdrawn."""
  cats = rec.get("categories") or []
  if isinstance(cats, str):
    cats = cats.split()
  versions = rec.get("versions") if isinstance(rec.get("versions"), list) else []
  raw_id = str(rec["id"]).strip()
  version = max(
    [_version_number(raw_id)]
    + [_version_number(v.get("version", "")) for v in versions if isinstance(v, dict)]
  )
  updated = str(rec.get("update_date") or rec.get("date") or "")[:10]
  date = str(rec.get("date") or _first_version_date(versions) or updated)[:10]
  return {
    "id": strip_version(raw_id),
    "version": version,
    "title": " ".join(str(rec.get("title") or "").split()),
    "abstract": " ".join(str(rec.get("abstract") or "").split()),
    "categories": [str(c) for c in cats],
    "date": date,
    "updated": updated,
    "license": str(rec.get("license") or ""),
    "withdrawn": is_withdrawal_notice(str(rec.get("comments") or "")),
  }


def read_jsonl(
  path: str | os.PathLike,
  skipped: collections.Counter | None = None,
  only: Container[int] | None = None,
) -> Iterator[tuple[int, dict]]:
  """``(line number, record)`` of a metadata/abstract JSONL file, records as
  ``normalise_record`` makes them; with ``only``, of those line numbers alone (the others are
  passed over unparsed: a second pass for the few records a first one picked).

  Accepts the project's own format (``categories`` a list, ``date``) and the public arXiv
  metadata snapshot (``categories`` a space separated string, ``versions``, ``license``,
  ``update_date``). A line that is not JSON or has no ``id`` raises ValueError naming the
  line; a record whose text cannot be UTF-8 (a lone surrogate such as ``"\\ud800"``, bytes
  that are not UTF-8) is skipped and counted in ``skipped["bad_unicode"]``, one with a field of
  the wrong JSON type (a numeric id, a list as title) in ``skipped["bad_field_<name>"]``.
  """
  path = Path(path)
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for lineno, line in enumerate(f, 1):
      if only is not None and lineno not in only:
        continue
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
      except RecursionError:
        raise ValueError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None
      if not isinstance(rec, dict) or "id" not in rec:
        raise ValueError(f"{path}:{lineno}: a record needs an 'id' field")
      if field_problem(rec):
        if skipped is not None:
          skipped[f"bad_field_{field_problem(rec)}"] += 1
        continue
      out = normalise_record(rec)
      try:
        json.dumps(out, ensure_ascii=False).encode("utf-8")
      except UnicodeEncodeError:
        if skipped is not None:
          skipped["bad_unicode"] += 1
        continue
      yield lineno, out
