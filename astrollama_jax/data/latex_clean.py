"""Turn a section's LaTeX into training text.

What happens to each construct (the contract of ``clean_latex``):

* comments: already gone (``latex_sections`` strips them); ``comment`` environments dropped.
* floats and non-prose environments (figure, table, deluxetable, tabular, algorithm,
  lstlisting, verbatim, ...): dropped with their contents.
* ``\\label``, ``\\cite*`` (all natbib/biblatex forms), ``\\ref``/``\\eqref``/``\\autoref``/
  ``\\cref``, ``\\footnote``, ``\\url``, ``\\includegraphics`` and other layout commands:
  dropped with their arguments (so "see Section~\\ref{x}" becomes "see Section").
* formatting macros (``\\textbf``, ``\\emph``, ``\\textit``, ``\\texttt``, ``\\mbox``,
  ``{\\bf ..}``, ``\\href{url}{text}`` -> text, ...) and any unknown macro with a brace
  argument: unwrapped to their (last) argument's text. Unknown macros without an argument
  are dropped, except zero-argument ``\\newcommand``/``\\def`` macros of the paper itself,
  which are expanded (bounded depth).
* sub-headings (``\\subsection{T}``, ``\\paragraph{T}``) become their title on its own line.
* lists: each ``\\item`` starts a new line with "- ".
* accents (``\\'e``, ``\\"{o}``, ``\\c{c}``) become Unicode; ``\\&``, ``\\%``, ``~``, ``--``,
  ``---``, TeX quotes become their characters.
* **math is kept as LaTeX**, the way arXiv abstracts carry it: inline math stays ``$...$``
  (``\\(..\\)`` becomes ``$..$``); display math (``\\[..\\]``, ``$$..$$``, equation, align,
  eqnarray, gather, multline and starred forms) becomes ``$$ .. $$``. Inside math only
  ``\\label``, ``\\nonumber`` and ``\\notag`` are removed; nothing else is rewritten.
* whitespace: runs of spaces/newlines become one space; a blank line (paragraph break)
  becomes ``\\n\\n``.

Every scan is linear in the input per nesting level and nesting is bounded, so cleaning
cannot hang; malformed input raises ``ParseError``.
"""

from __future__ import annotations

import re
import unicodedata

from astrollama_jax.data.latex_sections import ParseError, match_brace

MAX_DEPTH = 100
MAX_EXPANSIONS = 5000

DROP_ENVS = frozenset(
  """figure figure* table table* deluxetable deluxetable* tabular tabular*
tabularx longtable wrapfigure sidewaysfigure sidewaystable algorithm algorithmic lstlisting
verbatim verbatim* minted comment thebibliography tikzpicture picture acknowledgments
acknowledgements""".split()
)
MATH_ENVS = frozenset(
  """equation equation* align align* eqnarray eqnarray* gather gather*
multline multline* displaymath math flalign flalign* alignat alignat*""".split()
)
# command -> number of brace arguments dropped with it (optional [..] args always dropped)
DROP_CMDS = {
  "label": 1,
  "ref": 1,
  "eqref": 1,
  "autoref": 1,
  "cref": 1,
  "Cref": 1,
  "pageref": 1,
  "nameref": 1,
  "footnote": 1,
  "footnotetext": 1,
  "url": 1,
  "includegraphics": 1,
  "vspace": 1,
  "hspace": 1,
  "vspace*": 1,
  "hspace*": 1,
  "addtocounter": 2,
  "setcounter": 2,
  "bibliography": 1,
  "bibliographystyle": 1,
  "input": 1,
  "include": 1,
  "keywords": 1,
  "software": 1,
  "facilities": 1,
  "facility": 1,
  "thanks": 1,
  "affiliation": 1,
  "email": 1,
  "orcidlink": 1,
  "newcommand": 2,
  "renewcommand": 2,
  "def": 0,
  "caption": 1,
  "secref": 1,
  "Secref": 1,
  "figref": 1,
  "Figref": 1,
  "tabref": 1,
  "appref": 1,
  "uat": 2,
  "color": 1,
  "linewidth": 0,
  "textwidth": 0,
}
HEADINGS = frozenset(
  "subsection subsection* subsubsection subsubsection* paragraph paragraph* "
  "subparagraph section section*".split()
)
# keep the last argument: \href{url}{text} -> text
UNWRAP_LAST = {"href": 2, "textcolor": 2, "colorbox": 2}
SYMBOLS = {
  "&": "&",
  "%": "%",
  "$": "$",
  "#": "#",
  "_": "_",
  "{": "{",
  "}": "}",
  " ": " ",
  ",": " ",
  ";": " ",
  ":": " ",
  "!": "",
  "\\": " ",
  "-": "",
  "/": "",
  "@": "",
  "ldots": "...",
  "dots": "...",
  "ss": "ß",
  "ae": "æ",
  "oe": "œ",
  "o": "ø",
  "O": "Ø",
  "aa": "å",
  "AA": "Å",
  "l": "ł",
  "L": "Ł",
  "i": "ı",
  "LaTeX": "LaTeX",
  "TeX": "TeX",
  "textasciitilde": "~",
  "textbackslash": "\\",
  "S": "§",
  "P": "¶",
  "copyright": "©",
  "textendash": "–",
  "textemdash": "—",
  "item": "\n- ",
  "par": "\n\n",
  "newline": " ",
  "linebreak": " ",
  "quad": " ",
  "qquad": " ",
  "sim": "~",
  "degr": "°",
  "deg": "°",
  "arcsec": "″",
  "arcmin": "′",
  "%": "%",
}
ACCENTS = {
  "'": "\u0301",
  "`": "\u0300",
  "^": "\u0302",
  '"': "\u0308",
  "~": "\u0303",
  "=": "\u0304",
  ".": "\u0307",
  "u": "\u0306",
  "v": "\u030c",
  "H": "\u030b",
  "c": "\u0327",
  "k": "\u0328",
  "r": "\u030a",
}
_NAME_RE = re.compile(r"[A-Za-z@]+\*?")
_DEF_RE = re.compile(
  r"\\(?:newcommand|renewcommand|providecommand)\*?\s*\{?\\([A-Za-z@]+)\}?\s*(?=\{)"
  r"|\\def\s*\\([A-Za-z@]+)\s*(?=\{)"
)


def user_macros(preamble: str) -> dict[str, str]:
  """Zero-argument macros the paper defines (``\\newcommand{\\x}{..}``, ``\\def\\x{..}``)."""
  out = {}
  for m in _DEF_RE.finditer(preamble):
    try:
      close = match_brace(preamble, m.end())
    except ParseError:
      continue
    body = preamble[m.end() + 1 : close - 1]
    if "#" not in body and len(body) < 500:
      out[m.group(1) or m.group(2)] = body
  return out


class _Cleaner:
  def __init__(self, macros: dict[str, str]):
    self.macros = macros
    self.expansions = 0  # bounded so that self-multiplying macros cannot blow up
    self.out: list[str] = []
    names = sorted(macros, key=len, reverse=True)
    self.math_macro_re = (
      re.compile(r"\\(%s)(?![A-Za-z@])" % "|".join(map(re.escape, names))) if names else None
    )

  def _expand(self, name: str) -> str:
    self.expansions += 1
    return self.macros[name] if self.expansions < MAX_EXPANSIONS else ""

  def emit(self, s: str) -> None:
    self.out.append(s)

  def skip_args(self, text: str, i: int, n: int) -> int:
    """Skip optional [..] arguments and ``n`` brace arguments starting at ``i``."""
    j = i
    while True:
      k = j
      while k < len(text) and text[k] in " \t\n":
        k += 1
      if k < len(text) and text[k] == "[" and text.find("]", k) != -1:
        j = match_brace(text, k, "[", "]")
      elif n > 0 and k < len(text) and text[k] == "{":
        j = match_brace(text, k)
        n -= 1
      else:
        return j

  def args(self, text: str, i: int, n: int) -> tuple[list[str], int]:
    """The next ``n`` brace arguments (skipping optional ones) and the index after them."""
    got = []
    j = i
    while len(got) < n:
      k = j
      while k < len(text) and text[k] in " \t\n":
        k += 1
      if k < len(text) and text[k] == "[" and text.find("]", k) != -1:
        j = match_brace(text, k, "[", "]")
      elif k < len(text) and text[k] == "{":
        j = match_brace(text, k)
        got.append(text[k + 1 : j - 1])
      else:
        break
    return got, j

  def math(self, body: str, display: bool) -> None:
    body = re.sub(r"\\label\{[^{}]{0,300}\}|\\nonumber|\\notag", "", body).strip()
    if self.math_macro_re is not None and self.expansions < MAX_EXPANSIONS:
      body = self.math_macro_re.sub(lambda m: self._expand(m.group(1)), body)
    if body:
      self.emit(f" $${body}$$ " if display else f"${body}$")

  def run(self, text: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
      raise ParseError("too_deep", f"LaTeX nested more than {MAX_DEPTH} levels")
    i, n = 0, len(text)
    plain = re.compile(r"[^\\{}$~`'\-]+")
    while i < n:
      m = plain.match(text, i)
      if m:
        self.emit(m.group())
        i = m.end()
        continue
      c = text[i]
      if c == "{":
        j = match_brace(text, i)
        self.run(text[i + 1 : j - 1], depth + 1)
        i = j
      elif c == "}":
        i += 1  # stray closing brace (the caller checked balance): drop it
      elif c == "$":
        display = text.startswith("$$", i)
        delim = "$$" if display else "$"
        j = i + len(delim)
        while True:
          k = text.find(delim, j)
          if k == -1:
            raise ParseError("unbalanced_math", f"math opened at {i} never closes")
          if text[k - 1] != "\\":
            break
          j = k + 1
        self.math(text[i + len(delim) : k], display)
        i = k + len(delim)
      elif c == "~":
        self.emit(" ")
        i += 1
      elif c in "`'":
        if text.startswith(c * 2, i):
          self.emit('"')
          i += 2
        else:
          self.emit("'")
          i += 1
      elif c == "-":
        if text.startswith("---", i):
          self.emit("—")
          i += 3
        elif text.startswith("--", i):
          self.emit("–")
          i += 2
        else:
          self.emit("-")
          i += 1
      else:  # backslash
        i = self.command(text, i, depth)

  def command(self, text: str, i: int, depth: int) -> int:
    n = len(text)
    if i + 1 >= n:
      return n
    nxt = text[i + 1]
    if nxt in "([":
      close = "\\)" if nxt == "(" else "\\]"
      k = text.find(close, i + 2)
      if k == -1:
        raise ParseError("unbalanced_math", f"\\{nxt} at {i} never closes")
      self.math(text[i + 2 : k], display=nxt == "[")
      return k + 2
    if nxt in ACCENTS and not (nxt.isalpha() and i + 2 < n and text[i + 2].isalpha()):
      j = i + 2
      while j < n and text[j] == " " and nxt.isalpha():
        j += 1
      if j < n and text[j] == "{":
        k = match_brace(text, j)
        base = text[j + 1 : k - 1].replace("\\i", "i").replace("\\j", "j").strip() or " "
      elif j < n:
        k, base = j + 1, text[j]
      else:
        return n
      self.emit(unicodedata.normalize("NFC", base[0] + ACCENTS[nxt] + base[1:]))
      return k
    m = _NAME_RE.match(text, i + 1)
    if not m:
      self.emit(SYMBOLS.get(nxt, nxt))
      return i + 2
    name = m.group()
    j = m.end()
    if name.endswith("*") and name not in DROP_CMDS and name not in HEADINGS:
      name, j = name[:-1], j - 1
    if name in ("begin", "end"):
      return self.environment(text, i, j, name, depth)
    if name in self.macros and depth < 20 and self.expansions < MAX_EXPANSIONS:
      self.run(self._expand(name), depth + 5)
      return j
    if name == "ensuremath":
      got, k = self.args(text, j, 1)
      if got:
        self.math(got[0], display=False)
      return k
    if name in DROP_CMDS or name.startswith("cite") or name.startswith("Cite"):
      if name in ("newcommand", "renewcommand", "def"):
        return self.skip_args(text, j, 2 if name != "def" else 1)
      return self._after_drop(text, self.skip_args(text, j, DROP_CMDS.get(name, 1)))
    if name in HEADINGS:
      got, k = self.args(text, j, 1)
      self.emit("\n\n")
      if got:
        self.run(got[0], depth + 1)
      self.emit("\n\n")
      return k
    if name in UNWRAP_LAST:
      got, k = self.args(text, j, UNWRAP_LAST[name])
      if got:
        self.run(got[-1], depth + 1)
      return k
    if name in SYMBOLS:
      self.emit(SYMBOLS[name])
      return j if name == "item" else self._eat_space(text, j)
    got, k = self.args(text, j, 1)
    if got:  # unknown macro with an argument: unwrap it
      self.run(got[0], depth + 1)
      return k
    return self._eat_space(text, j)  # unknown macro without argument: drop

  def _after_drop(self, text: str, pos: int) -> int:
    """A construct dropped from its own line must not leave a blank line (paragraph break)."""
    last = "".join(self.out[-2:]).rstrip(" \t")
    if not last.endswith("\n"):
      return pos
    k = pos
    while k < len(text) and text[k] in " \t":
      k += 1
    return k + 1 if k < len(text) and text[k] == "\n" else pos

  @staticmethod
  def _eat_space(text: str, j: int) -> int:
    # "\foo bar": TeX swallows the space after a control word; keep one so words stay apart
    return j

  def environment(self, text: str, i: int, j: int, which: str, depth: int) -> int:
    got, k = self.args(text, j, 1)
    if not got:
      return j
    env = got[0].strip()
    if which == "end":
      return k  # an \end without its \begin (section cut inside an environment): drop
    # find the matching \end{env}, counting nested \begin{env}
    open_tag, close_tag = "\\begin{%s}" % env, "\\end{%s}" % env
    level, pos = 1, k
    while level:
      e = text.find(close_tag, pos)
      if e == -1:
        raise ParseError("unbalanced_environment", f"\\begin{{{env}}} never ends")
      b = text.find(open_tag, pos, e)
      if b != -1:
        level, pos = level + 1, b + len(open_tag)
      else:
        level, pos = level - 1, e + len(close_tag)
    body = text[k : pos - len(close_tag)]
    if env in DROP_ENVS:
      return self._after_drop(text, pos)
    elif env in MATH_ENVS:
      self.math(body, display=True)
    else:
      if env in ("itemize", "enumerate", "description"):
        self.emit("\n")
      self.run(body, depth + 1)
      if env in ("itemize", "enumerate", "description", "quote", "quotation", "center"):
        self.emit("\n")
    return pos


def normalize_whitespace(text: str) -> str:
  """One space within a paragraph, a blank line between paragraphs, no edge spaces."""
  paras = re.split(r"\n[ \t]*\n\s*", text)
  out = []
  for p in paras:
    lines = [" ".join(line.split()) for line in p.split("\n")]
    lines = [line for line in lines if line]
    # list items keep their line; other newlines inside a paragraph become spaces
    joined = ""
    for line in lines:
      if not joined:
        joined = line
      elif line.startswith("- "):
        joined += "\n" + line
      else:
        joined += " " + line
    if joined:
      out.append(joined)
  text = "\n\n".join(out)
  return re.sub(r" +([.,;:)])", r"\1", text)


def clean_latex(latex: str, macros: dict[str, str] | None = None) -> str:
  """Plain training text for one section's LaTeX; raises ParseError on malformed input."""
  c = _Cleaner(macros or {})
  c.run(latex)
  return normalize_whitespace("".join(c.out))
