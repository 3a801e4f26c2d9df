"""Extract abstract, introduction and conclusion from one arXiv LaTeX source.

The entry point is ``extract_paper(path)``: read the bundle (``sources``), find the main
file and inline its inputs (``latex_sections``), cut out the three sections, clean them
(``latex_clean``). Anything that goes wrong raises ``ParseError`` with a short reason;
``process_paper`` turns that into a manifest entry instead, and bounds the wall time
spent on one document (``signal.setitimer``; all scans are linear anyway, this is the
belt to those braces).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from typing import Mapping

from astrollama_jax.data import latex_clean, latex_sections, sources
from astrollama_jax.data.latex_sections import SECTION_NAMES, ParseError, Span

DEFAULT_TIMEOUT_S = 30.0


@dataclasses.dataclass
class Section:
  name: str  # abstract | introduction | conclusion
  title: str  # the \section{...} argument as written ("" for the abstract)
  spans: list[Span]  # where the raw LaTeX lies: (file, start, end) in the bundle's files
  latex: str  # the raw body, comments removed and inputs inlined
  text: str  # cleaned training text (see latex_clean for what happens to math)


@dataclasses.dataclass
class Paper:
  id: str
  version: int
  source: str  # the path it came from
  main_file: str
  title: str  # from \title{...}, cleaned ("" if none)
  sections: dict[str, Section]
  missing_inputs: list[str]  # \input targets that were not in the bundle


@dataclasses.dataclass
class Skipped:
  id: str
  source: str
  reason: str
  detail: str


def _latex_title(text: str, macros: dict[str, str]) -> str:
  i = text.find("\\title")
  while i != -1:
    j = i + len("\\title")
    while j < len(text) and text[j] in " \t\n":
      j += 1
    if j < len(text) and text[j] == "[":
      j = latex_sections.match_brace(text, j, "[", "]")
    if j < len(text) and text[j] == "{":
      close = latex_sections.match_brace(text, j)
      return " ".join(latex_clean.clean_latex(text[j + 1 : close - 1], macros).split())
    i = text.find("\\title", i + 1)
  return ""


def extract_files(
  files: Mapping[str, str], paper_id: str = "", source: str = "", version: int = 0
) -> Paper:
  """Sections of a paper given as ``{relative path: text}``."""
  main = latex_sections.find_main_file(files)
  doc, missing = latex_sections.flatten(files, main)
  latex_sections.check_balanced(doc.text)
  begin = doc.text.find("\\begin{document}")
  macros = latex_clean.user_macros(doc.text[: max(begin, 0)])
  sections = {}
  for name, raw in latex_sections.find_sections(doc).items():
    text = latex_clean.clean_latex(raw.latex, macros)
    if text.strip():
      sections[name] = Section(name, raw.title, raw.spans, raw.latex, text)
  if not sections:
    raise ParseError("no_sections", "no abstract, introduction or conclusion found")
  try:
    title = _latex_title(doc.text, macros)
  except ParseError:
    title = ""
  return Paper(paper_id, version, source, main, title, sections, missing)


def extract_paper(path: str | os.PathLike, max_bytes: int = sources.DEFAULT_MAX_BYTES) -> Paper:
  """Read one bundle (.gz, .tar.gz, folder, .tex) and extract its sections."""
  paper_id, version = sources.paper_id_from_path(path)
  files = sources.read_bundle(path, max_bytes=max_bytes)
  return extract_files(files, paper_id, str(path), version)


class _Timeout(Exception):
  pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
  """Raise ParseError('timeout') if the block runs longer than ``seconds`` (main thread only)."""
  if (
    not seconds
    or threading.current_thread() is not threading.main_thread()
    or not hasattr(signal, "setitimer")
  ):
    yield
    return

  def on_alarm(signum, frame):
    raise _Timeout()

  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  except _Timeout:
    raise ParseError("timeout", f"took longer than {seconds:g} s") from None
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def process_paper(
  path: str | os.PathLike,
  timeout_s: float | None = DEFAULT_TIMEOUT_S,
  max_bytes: int = sources.DEFAULT_MAX_BYTES,
) -> Paper | Skipped:
  """``extract_paper`` that never raises for a bad document: it returns ``Skipped``."""
  paper_id, _ = sources.paper_id_from_path(path)
  try:
    with time_limit(timeout_s):
      return extract_paper(path, max_bytes=max_bytes)
  except ParseError as e:
    return Skipped(paper_id, str(path), e.reason, e.detail)
  except RecursionError:
    return Skipped(paper_id, str(path), "too_deep", "nesting exceeds Python's recursion limit")
  except (OSError, UnicodeError, ValueError, IndexError) as e:  # anything else the file did
    return Skipped(paper_id, str(path), "parse_error", f"{type(e).__name__}: {e}")
  except Exception as e:  # a bug of ours must not stop a corpus build: record it, go on
    return Skipped(paper_id, str(path), "internal_error", f"{type(e).__name__}: {e}")


__all__ = [
  "Paper",
  "Section",
  "Skipped",
  "Span",
  "ParseError",
  "SECTION_NAMES",
  "extract_paper",
  "extract_files",
  "process_paper",
  "time_limit",
]
