"""Read arXiv inputs as downloaded: LaTeX bundles and metadata JSON lines.

A LaTeX *bundle* is what arXiv serves for one paper: a gzipped single ``.tex``
(``<id>.gz``), a tarball with several files (``<id>.tar.gz``/``.tgz``/``.tar``, or a
``.gz`` that turns out to be a tar), a plain ``.tex``, or a folder. ``read_bundle``
returns its TeX files as ``{relative path: text}`` or raises ``ParseError`` with a
manifest reason; it never reads more than ``max_bytes`` so a huge or hostile archive
cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

from astrollama_jax.data.latex_sections import ParseError

DEFAULT_MAX_BYTES = 8 << 20
TEX_SUFFIXES = (".tex", ".ltx", ".latex")
BUNDLE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gz", ".tex")
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
    names = [p.name.lower() for p in path.iterdir() if p.is_file()]
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


def _read_tar(fileobj, max_bytes: int, label: str) -> dict[str, str]:
  files: dict[str, str] = {}
  total = 0
  try:
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
      for member in tar:
        if not member.isfile() or not member.name.lower().endswith(TEX_SUFFIXES):
          continue
        total += member.size
        if total > max_bytes:
          raise ParseError("too_large", f"{label}: TeX files exceed {max_bytes} bytes")
        f = tar.extractfile(member)
        if f is None:
          continue
        name = os.path.normpath(member.name).replace(os.sep, "/").lstrip("./")
        files[name] = decode_tex(f.read(), f"{label}:{member.name}")
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise ParseError("bad_archive", f"{label}: {e}") from None
  return files


def read_bundle(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, str]:
  """All TeX files of one paper's source, keyed by path relative to the bundle root."""
  path = Path(path)
  label = str(path)
  if not path.exists():
    raise ParseError("missing", f"{label} does not exist")
  files: dict[str, str] = {}
  if path.is_dir():
    total = 0
    for p in sorted(path.rglob("*")):
      if p.is_file() and p.suffix.lower() in TEX_SUFFIXES:
        total += p.stat().st_size
        if total > max_bytes:
          raise ParseError("too_large", f"{label}: TeX files exceed {max_bytes} bytes")
        files[p.relative_to(path).as_posix()] = decode_tex(p.read_bytes(), str(p))
  elif path.stat().st_size == 0:
    raise ParseError("empty", f"{label} is an empty file")
  elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
    with open(path, "rb") as f:
      files = _read_tar(f, max_bytes, label)
  elif path.name.endswith(".gz"):
    try:
      with gzip.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as e:
      raise ParseError("bad_archive", f"{label}: {e}") from None
    if len(data) > max_bytes:
      raise ParseError("too_large", f"{label} decompresses to more than {max_bytes} bytes")
    if len(data) > 262 and data[257:262] == b"ustar":  # arXiv serves some tarballs as .gz
      files = _read_tar(io.BytesIO(data), max_bytes, label)
    else:
      files = {
        path.name[:-3] + ("" if path.name[:-3].endswith(".tex") else ".tex"): decode_tex(
          data, label
        )
      }
  else:
    if path.stat().st_size > max_bytes:
      raise ParseError("too_large", f"{label} is larger than {max_bytes} bytes")
    files = {path.name: decode_tex(path.read_bytes(), label)}
  if not files:
    raise ParseError("no_tex", f"{label} holds no .tex file")
  return files


# ----------------------------------------------------------------------------- JSON lines


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
  """Records of a metadata/abstract JSONL file, normalised to id, title, abstract,
  categories (list), date.

  Accepts the project's own format (``categories`` a list, ``date``) and the public arXiv
  metadata snapshot (``categories`` a space separated string, ``update_date`` or the
  first ``versions`` entry for the date). Bad lines raise ValueError naming the line.
  """
  path = Path(path)
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
      if not isinstance(rec, dict) or "id" not in rec:
        raise ValueError(f"{path}:{lineno}: a record needs an 'id' field")
      cats = rec.get("categories") or []
      if isinstance(cats, str):
        cats = cats.split()
      date = rec.get("date") or rec.get("update_date") or ""
      yield {
        "id": strip_version(str(rec["id"]).strip()),
        "title": " ".join(str(rec.get("title") or "").split()),
        "abstract": " ".join(str(rec.get("abstract") or "").split()),
        "categories": [str(c) for c in cats],
        "date": str(date)[:10],
      }
