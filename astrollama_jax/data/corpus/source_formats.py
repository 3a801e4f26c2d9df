"""The input formats of a corpus build, in one table, and the inputs sorted by it into units.

``SOURCE_FORMATS`` lists every kind of input a ``--source`` path may be, in the order they are
tried: a recognizer (``(path, named on the command line) -> bool``) and a reader. A metadata
format reads records (``records``: ``(path, skipped, only) -> (position, record)``, records as
``sources.normalise_record`` makes them); a LaTeX format lists the papers' sources it holds
(``entries``: ``path -> (entries, error)``). Adding a format is one entry here and its reader
function (in ``data/sources.py``); parsing, planning and the manifest take it from there.

A symbolic link met while searching a folder is never followed (``LINK``, tried first): it is an
entry skipped with reason ``link``, so the manifest accounts for it. A path named on the command
line is taken as named, link or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import os
from pathlib import Path

from astrollama_jax.data import sources

RecordReader = Callable[..., Iterator[tuple[int, dict]]]  # (path, skipped, only=None)
EntryReader = Callable[[str], tuple[list[sources.Entry], str]]


@dataclasses.dataclass(frozen=True)
class SourceFormat:
  """One kind of input: how it is recognised and what reads it (``records`` or ``entries``)."""

  name: str  # as the docs and error messages name it
  recognize: Callable[[Path, bool], bool]  # (path, named on the command line) -> whether it is one
  records: RecordReader | None = None  # metadata: its records by position (line)
  entries: EntryReader | None = None  # LaTeX: the papers' sources it holds
  own_unit: bool = False  # LaTeX: parsed (and resumed) as a unit of its own, not with its folder


def _is_link(path: Path, named: bool) -> bool:
  return not named and path.is_symlink()


def _link(path: str) -> tuple[list[sources.Entry], str]:
  return [sources.link_entry(path)], ""


def _is_metadata(path: Path, named: bool) -> bool:
  name = path.name
  return not path.is_dir() and (
    name.endswith(".jsonl")
    or (name.endswith(".json") and (named or name.startswith("arxiv-metadata")))
  )


def _is_bulk_tar(path: Path, named: bool) -> bool:
  return sources.is_bulk_tar(path)


def _is_paper_folder(path: Path, named: bool) -> bool:
  return path.is_dir() and sources.is_bundle(path)


def _is_bundle_file(path: Path, named: bool) -> bool:
  return not path.is_dir() and sources.is_bundle(path)


def _one_paper(path: str) -> tuple[list[sources.Entry], str]:
  """A bundle is one paper's source (its kind is recognised by content when it is read)."""
  return [sources.Entry(path)], ""


LINK = SourceFormat("symbolic link found in a folder (not followed)", _is_link, entries=_link)

SOURCE_FORMATS: tuple[SourceFormat, ...] = (
  LINK,
  SourceFormat(
    "metadata JSON lines (.jsonl; arxiv-metadata*.json, the arXiv snapshot)",
    _is_metadata,
    records=sources.read_jsonl,
  ),
  SourceFormat(
    "arXiv bulk source tar (arXiv_src_YYMM_NNN.tar)",
    _is_bulk_tar,
    entries=sources.bulk_entries,
    own_unit=True,
  ),
  SourceFormat("paper folder (.tex files, no archives)", _is_paper_folder, entries=_one_paper),
  SourceFormat(
    "LaTeX bundle (.gz, .tar.gz, .tgz, .tar, .tex, .pdf)", _is_bundle_file, entries=_one_paper
  ),
)


def format_of(path: Path, named: bool) -> SourceFormat | None:
  """The first format in ``SOURCE_FORMATS`` that recognizes ``path``, or None."""
  return next((f for f in SOURCE_FORMATS if f.recognize(path, named)), None)


def metadata_reader(path: Path) -> RecordReader:
  """The records reader of metadata file ``path``; ValueError if no metadata format takes it."""
  fmt = format_of(Path(path), True)
  if fmt is None or fmt.records is None:
    raise ValueError(f"{path} is not a metadata file")
  return fmt.records


@dataclasses.dataclass(frozen=True)
class Source:
  """One input path and its format."""

  path: Path
  format: SourceFormat

  @property
  def is_metadata(self) -> bool:
    return self.format.records is not None


def discover(paths: Iterable[str | os.PathLike]) -> list[Source]:
  """Every input under ``paths`` with its format (see ``SOURCE_FORMATS``), folders searched in
  sorted order; raises on a missing path, an empty metadata file, a named path of no format or
  a named folder that holds none. A folder no format takes is searched; files in it that no
  format takes are passed over."""
  found: list[Source] = []

  def visit(p: Path, named: bool) -> None:
    fmt = format_of(p, named)
    if fmt is not None:
      if fmt.records is not None and p.stat().st_size == 0:
        raise ValueError(f"source file {p} is empty")
      found.append(Source(p, fmt))
    elif p.is_dir():
      before = len(found)
      for child in sorted(p.iterdir()):
        visit(child, False)
      if named and len(found) == before:
        raise ValueError(f"source folder {p} holds no .jsonl file and no LaTeX source")
    elif named:
      kinds = "; ".join(f.name for f in SOURCE_FORMATS if f is not LINK)
      raise ValueError(f"source {p} is none of: {kinds}; nor a folder of them")

  for raw in paths:
    p = Path(raw)
    if not p.exists():
      raise ValueError(f"source does not exist: {p}")
    visit(p, True)
  return found


@dataclasses.dataclass(frozen=True)
class Unit:
  """What one result file holds: one source of its own (a bulk tar), or the loose sources of
  one folder."""

  path: str
  bulk: bool  # a source of its own (named by its file name), not a folder's loose sources
  bundles: tuple[str, ...] = ()
  formats: tuple[SourceFormat, ...] = dataclasses.field(default=(), compare=False, repr=False)

  @property
  def name(self) -> str:
    """How the dataset remembers the unit: a bulk tar by its file name, a folder by its path."""
    return Path(self.path).name if self.bulk else self.path

  def fingerprint(self) -> list:
    """Names, sizes and modification times of everything the unit reads."""

    def stat(p: str) -> list:
      st = os.lstat(p)
      return [p, st.st_size, st.st_mtime_ns]

    if self.bulk:
      return [stat(self.path)]
    out = []
    for b in self.bundles:
      if os.path.isdir(b) and not os.path.islink(b):
        out += [
          stat(os.path.join(r, n)) for r, _, names in sorted(os.walk(b)) for n in sorted(names)
        ]
      else:
        out.append(stat(b))
    return out

  def size(self) -> int:
    return sum(f[1] for f in self.fingerprint())

  def entries(self) -> tuple[list[sources.Entry], str]:
    """The papers' sources the unit holds, as its formats list them, and an error message if a
    source is cut short or corrupt ("" if all read to their end)."""
    if self.bulk:
      return self.formats[0].entries(self.path)
    out: list[sources.Entry] = []
    errors: list[str] = []
    for bundle, fmt in zip(self.bundles, self.formats):
      entries, error = fmt.entries(bundle)
      out += entries
      errors += [error] if error else []
    return out, "; ".join(errors)


def units_of(found: Sequence[Source]) -> list[Unit]:
  """Each source of a format with ``own_unit`` is a unit; other LaTeX sources are grouped by the
  folder that holds them (in the order found)."""
  units: list[Unit] = []
  loose: dict[str, list[Source]] = {}
  for s in found:
    if s.is_metadata:
      continue
    if s.format.own_unit:
      units.append(Unit(str(s.path), True, formats=(s.format,)))
    else:
      parent = str(s.path.parent)
      if parent not in loose:
        loose[parent] = []
        units.append(Unit(parent, False))
      loose[parent].append(s)
  return [
    u
    if u.bulk
    else Unit(
      u.path,
      False,
      tuple(str(s.path) for s in loose[u.path]),
      tuple(s.format for s in loose[u.path]),
    )
    for u in units
  ]
