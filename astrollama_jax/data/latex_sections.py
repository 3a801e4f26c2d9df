"""Find the main file of a LaTeX paper, inline its inputs, and cut out sections.

Why a hand-written scanner: the sections we want are delimited by LaTeX structure
(brace groups, environments, ``\\section`` headings) that regular expressions cannot
match without backtracking. Every scan here is linear (``str.find`` and brace
counting); the few regular expressions have no nested quantifiers, so a document
cannot make them run for ever.

Offsets: the paper is "flattened" into one string in which comments are removed and
``\\input``/``\\include`` are replaced by the included file's text. The flat string is
a concatenation of *pieces*, each a slice of one original file, so any range of the
flat text maps back to (file, start, end) spans of the raw sources.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
import dataclasses
import posixpath
import re

import numpy as np

SECTION_NAMES = ("abstract", "introduction", "conclusion")
MAX_INPUT_DEPTH = 8


class ParseError(ValueError):
  """A document we cannot parse; ``reason`` is a short manifest key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class Span:
  """A half-open character range ``[start, end)`` of one source file."""

  file: str
  start: int
  end: int


@dataclasses.dataclass
class RawSection:
  """A section as found: its title, the raw spans and the flat (comment-free) LaTeX."""

  name: str  # "abstract" | "introduction" | "conclusion"
  title: str  # the \section argument as written ("" for the abstract)
  spans: list[Span]  # raw-source ranges, in reading order
  latex: str  # the body with comments removed and inputs inlined


# ----------------------------------------------------------------------------- scanning


def match_brace(text: str, i: int, open_ch: str = "{", close_ch: str = "}") -> int:
  """Index just past the group that opens at ``text[i]``; raises ParseError if unbalanced."""
  if text[i] != open_ch:
    raise ValueError(f"no {open_ch!r} at {i}")
  depth = 0
  n = len(text)
  j = i
  while j < n:
    c = text[j]
    if c == "\\":
      j += 2  # an escaped character (\{, \}, \\) never counts
      continue
    if c == open_ch:
      depth += 1
    elif c == close_ch:
      depth -= 1
      if depth == 0:
        return j + 1
    j += 1
  raise ParseError("unbalanced_braces", f"group opened at offset {i} never closes")


# A backslash escapes the character after it; only escaped braces and backslashes change what
# the brace count sees (``\\{`` is an escaped backslash, then a real brace).
_ESCAPED = re.compile(r"\\[\\{}]")


def check_balanced(text: str, max_depth: int = 200) -> None:
  """Raise ParseError if ``{``/``}`` do not balance or nest deeper than ``max_depth``.

  Vectorised (a character loop was most of the parse time): escaped pairs are blanked at the
  same length, so offsets stay those of ``text``, then the depth is a cumulative sum over the
  braces' code points. The first offending brace is reported, as a left-to-right scan would.
  """
  if "{" not in text and "}" not in text:
    return
  codes = np.frombuffer(_ESCAPED.sub("  ", text).encode("utf-32-le"), np.uint32)
  where = np.flatnonzero((codes == 123) | (codes == 125))
  if not len(where):
    return
  depth = np.cumsum(np.where(codes[where] == 123, 1, -1), dtype=np.int64)
  deep = np.flatnonzero(depth > max_depth)
  under = np.flatnonzero(depth < 0)
  if len(deep) and (not len(under) or deep[0] < under[0]):
    raise ParseError("unbalanced_braces", f"nesting deeper than {max_depth}")
  if len(under):
    raise ParseError("unbalanced_braces", f"unmatched '}}' at offset {int(where[under[0]])}")
  if depth[-1]:
    raise ParseError("unbalanced_braces", f"{int(depth[-1])} group(s) never closed")


def comment_free_ranges(text: str) -> list[tuple[int, int]]:
  """Ranges of ``text`` outside ``%`` comments (an unescaped % up to, not including, newline)."""
  out = []
  pos = 0
  k = text.find("%")
  while k != -1:
    b = k - 1
    while b >= 0 and text[b] == "\\":
      b -= 1
    if (k - 1 - b) % 2 == 1:  # odd number of backslashes: \% is a literal percent
      k = text.find("%", k + 1)
      continue
    if k > pos:
      out.append((pos, k))
    nl = text.find("\n", k)
    pos = len(text) if nl == -1 else nl
    k = text.find("%", pos)
  if pos < len(text):
    out.append((pos, len(text)))
  return out


def strip_comments(text: str) -> str:
  return "".join(text[a:b] for a, b in comment_free_ranges(text))


# ----------------------------------------------------------------------------- flattening


class FlatDoc:
  """The paper as one comment-free string plus a map back to the raw files."""

  def __init__(self, files: Mapping[str, str], pieces: list[Span]):
    self.files = files
    self.pieces = pieces
    self.offsets = []
    parts = []
    pos = 0
    for p in pieces:
      self.offsets.append(pos)
      parts.append(files[p.file][p.start : p.end])
      pos += p.end - p.start
    self.text = "".join(parts)

  def spans(self, a: int, b: int) -> list[Span]:
    """Raw spans covering flat range [a, b); consecutive pieces of one file are merged."""
    out: list[Span] = []
    if b <= a:
      return out
    i = max(bisect.bisect_right(self.offsets, a) - 1, 0)
    while i < len(self.pieces) and self.offsets[i] < b:
      p, off = self.pieces[i], self.offsets[i]
      s = p.start + max(a - off, 0)
      e = p.start + min(b - off, p.end - p.start)
      if e > s:
        if out and out[-1].file == p.file and out[-1].end <= s:
          out[-1] = Span(p.file, out[-1].start, e)
        else:
          out.append(Span(p.file, s, e))
      i += 1
    return out


_INPUT_RE = re.compile(
  r"\\(?:input|include)(?![A-Za-z@])[ \t]*(?:\{([^{}\n]{1,300})\}|([A-Za-z0-9_./-]{1,300}))"
)


def _slice_pieces(pieces: list[Span], offsets: list[int], a: int, b: int) -> list[Span]:
  out = []
  for p, off in zip(pieces, offsets):
    s, e = max(a, off), min(b, off + p.end - p.start)
    if e > s:
      out.append(Span(p.file, p.start + s - off, p.start + e - off))
  return out


def _resolve(name: str, including: str, main_dir: str, files: Mapping[str, str]) -> str | None:
  name = name.strip().strip('"')
  for base in (main_dir, posixpath.dirname(including), ""):
    for cand in (name, name + ".tex"):
      path = posixpath.normpath(posixpath.join(base, cand))
      if path in files:
        return path
  return None


def _flatten(
  file: str, files: Mapping[str, str], main_dir: str, stack: tuple[str, ...], missing: list[str]
) -> list[Span]:
  text = files[file]
  pieces = [Span(file, a, b) for a, b in comment_free_ranges(text)]
  flat = FlatDoc(files, pieces)
  out: list[Span] = []
  pos = 0
  for m in _INPUT_RE.finditer(flat.text):
    child = _resolve(m.group(1) or m.group(2), file, main_dir, files)
    if child is None or child in stack or len(stack) >= MAX_INPUT_DEPTH:
      if child is None:
        missing.append(m.group(1) or m.group(2))
      continue
    out += _slice_pieces(flat.pieces, flat.offsets, pos, m.start())
    out += _flatten(child, files, main_dir, stack + (child,), missing)
    pos = m.end()
  out += _slice_pieces(flat.pieces, flat.offsets, pos, len(flat.text))
  return out


def find_main_file(files: Mapping[str, str]) -> str:
  """The file with ``\\documentclass`` and ``\\begin{document}`` (largest wins a tie)."""
  scored = []
  for name, text in files.items():
    has_doc = "\\begin{document}" in text
    if not has_doc:
      continue
    clean = strip_comments(text)
    score = ("\\begin{document}" in clean) + ("\\documentclass" in clean) * 2
    if score:
      scored.append((score, len(text), name))
  if not scored:
    raise ParseError("no_main_file", "no file has \\documentclass and \\begin{document}")
  scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
  return scored[0][2]


def flatten(files: Mapping[str, str], main: str | None = None) -> tuple[FlatDoc, list[str]]:
  """Inline ``\\input``/``\\include`` from the main file; returns the doc and missing inputs."""
  main = main or find_main_file(files)
  missing: list[str] = []
  pieces = _flatten(main, files, posixpath.dirname(main), (main,), missing)
  return FlatDoc(files, pieces), missing


# ----------------------------------------------------------------------------- sections

_SECTION_RE = re.compile(r"\\section(?![A-Za-z@])\*?[ \t\n]*(?=[\[{])")
_END_RE = re.compile(
  r"\\section(?![A-Za-z@])|\\appendix(?![A-Za-z@])|\\acknowledge?ments?(?![A-Za-z@])"
  r"|\\bibliography|\\printbibliography|\\software(?![A-Za-z@])|\\facilities(?![A-Za-z@])"
  r"|\\begin\{(?:acknowledge?ments?|thebibliography|appendix|appendices)\}"
  r"|\\end\{document\}|\\paragraph\*?\{acknowledge?ments?",
  re.IGNORECASE,
)
_APPENDIX_RE = re.compile(
  r"\\appendix(?![A-Za-z@])|\\begin\{append(?:ix|ices)\}|\\bibliography\{"
  r"|\\begin\{thebibliography\}|\\printbibliography"
)
_FLOATS = (
  "figure",
  "figure*",
  "table",
  "table*",
  "deluxetable",
  "deluxetable*",
  "wrapfigure",
  "sidewaysfigure",
  "sidewaystable",
)
_LAYOUT_AT_START = re.compile(
  r"\\(?:label|vspace\*?|hspace\*?|addtocounter|setcounter)\{[^{}]{0,200}\}(?:\{[^{}]{0,200}\})?"
  r"|\\(?:clearpage|newpage|noindent|pagebreak|smallskip|medskip|bigskip|centering)(?![A-Za-z@])"
)
_LAYOUT_AT_END = re.compile(
  r"(?:\\(?:label|vspace\*?|hspace\*?|addtocounter|setcounter)\{[^{}]{0,200}\}(?:\{[^{}]{0,200}\})?"
  r"|\\(?:clearpage|newpage|noindent|pagebreak|smallskip|medskip|bigskip|centering))\s*\Z"
)
_INTRO_RE = re.compile(r"introduction|^\s*motivation", re.IGNORECASE)
_CONCL_RE = re.compile(
  r"conclu|summary|discussion|outlook|closing remarks|final remarks", re.IGNORECASE
)


def _skip_ws(text: str, i: int, end: int) -> int:
  while i < end and text[i].isspace():
    i += 1
  return i


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
  """Drop floats, labels and layout commands at the very start and end of ``text[a:b]``."""
  while True:
    a = _skip_ws(text, a, b)
    m = _LAYOUT_AT_START.match(text, a, b)
    if m:
      a = m.end()
      continue
    float_env = next((e for e in _FLOATS if text.startswith("\\begin{%s}" % e, a)), None)
    if float_env:
      close = text.find("\\end{%s}" % float_env, a, b)
      if close == -1:
        break
      a = close + len("\\end{%s}" % float_env)
      continue
    break
  while b > a:
    while b > a and text[b - 1].isspace():
      b -= 1
    window = max(a, b - 400)
    m = _LAYOUT_AT_END.search(text, window, b)
    if m and m.start() >= a:
      b = m.start()
      continue
    float_env = next((e for e in _FLOATS if text.endswith("\\end{%s}" % e, a, b)), None)
    if float_env:
      open_ = text.rfind("\\begin{%s}" % float_env, a, b)
      if open_ == -1:
        break
      b = open_
      continue
    break
  return a, b


def _title_text(title: str) -> str:
  title = re.sub(r"\\label\{[^{}]{0,300}\}", "", title)
  title = title.replace("\\&", "&")
  return re.sub(r"\s+", " ", re.sub(r"\\[A-Za-z]+|[{}]", " ", title)).strip()


@dataclasses.dataclass
class _Heading:
  title: str
  start: int  # of the \section command
  body_start: int


def _headings(text: str, a: int, b: int) -> list[_Heading]:
  out = []
  for m in _SECTION_RE.finditer(text, a, b):
    i = m.end()
    if text[i] == "[":
      i = _skip_ws(text, match_brace(text, i, "[", "]"), b)
    if i >= b or text[i] != "{":
      continue
    close = match_brace(text, i)
    title = text[i + 1 : close - 1]
    body = close
    while True:  # a \label{...} directly after the heading belongs to it
      j = _skip_ws(text, body, b)
      if text.startswith("\\label{", j):
        body = match_brace(text, j + len("\\label"))
      else:
        break
    out.append(_Heading(title, m.start(), body))
  return out


def _body_end(text: str, start: int, limit: int) -> int:
  m = _END_RE.search(text, start, limit)
  return m.start() if m else limit


def _section(
  doc: FlatDoc, name: str, title: str, pieces: list[tuple[int, int]]
) -> RawSection | None:
  pieces = [_trim(doc.text, a, b) for a, b in pieces]
  pieces = [(a, b) for a, b in pieces if b > a]
  if not pieces:
    return None
  spans = [s for a, b in pieces for s in doc.spans(a, b)]
  latex = "\n\n".join(doc.text[a:b] for a, b in pieces)
  return RawSection(name, title, spans, latex)


def _abstract(doc: FlatDoc, start: int, end: int) -> RawSection | None:
  text = doc.text
  for a, b in ((start, end), (0, start)):
    i = text.find("\\begin{abstract}", a, b)
    if i != -1:
      body = i + len("\\begin{abstract}")
      close = text.find("\\end{abstract}", body, b)
      if close == -1:
        raise ParseError("unbalanced_environment", "\\begin{abstract} without \\end{abstract}")
      kw = text.find("\\keywords", body, close)
      return _section(doc, "abstract", "", [(body, close if kw == -1 else kw)])
    for m in re.finditer(r"\\abstract(?![A-Za-z@])", text[a:b]):
      i = a + m.end()
      before = text[max(a, a + m.start() - 12) : a + m.start()]
      if "def" in before or "command" in before or "let" in before:
        continue
      groups = []
      j = _skip_ws(text, i, b)
      while j < b and text[j] == "{":
        close = match_brace(text, j)
        groups.append((j + 1, close - 1))
        j = _skip_ws(text, close, b)
      if groups:
        return _section(doc, "abstract", "", groups)
  return None


def find_sections(doc: FlatDoc) -> dict[str, RawSection]:
  """Abstract, introduction and conclusion of a flattened paper (those found)."""
  text = doc.text
  begin = text.find("\\begin{document}")
  start = 0 if begin == -1 else begin + len("\\begin{document}")
  end = text.find("\\end{document}", start)
  end = len(text) if end == -1 else end
  found: dict[str, RawSection] = {}
  abstract = _abstract(doc, start, end)
  if abstract:
    found["abstract"] = abstract
  app = _APPENDIX_RE.search(text, start, end)
  body_limit = app.start() if app else end
  heads = [h for h in _headings(text, start, end) if h.start < body_limit]
  intro = next((h for h in heads if _INTRO_RE.search(_title_text(h.title))), None)
  concl = next((h for h in reversed(heads) if _CONCL_RE.search(_title_text(h.title))), None)
  for name, head in (("introduction", intro), ("conclusion", concl)):
    if head is None or (name == "conclusion" and intro is not None and head is intro):
      continue
    sec = _section(
      doc, name, head.title, [(head.body_start, _body_end(text, head.body_start, end))]
    )
    if sec:
      found[name] = sec
  return found
