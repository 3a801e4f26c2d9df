"""LaTeX ingestion, section extraction and cleaning."""

from __future__ import annotations

import json

from helpers import LABELLED_LATEX, MINI_BODY, MINI_PAPER, need, write_gz, write_tar_gz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from astrollama_jax.data import latex, latex_clean, latex_sections, sources

# ----------------------------------------------------------------------------- real papers


def _check_labelled(paper_dir):
  labels = json.loads((paper_dir / "labels.json").read_text())
  paper = latex.extract_paper(paper_dir)
  row = {}
  for name in latex.SECTION_NAMES:
    want = labels.get(name)
    if want is None:
      continue
    got = paper.sections.get(name)
    if got is None:
      row[name] = "missing"
      continue
    words = got.latex.split()
    problems = []
    if " ".join(words[:8]) != want["first_words"]:
      problems.append("start")
    if " ".join(words[-8:]) != want["last_words"]:
      problems.append("end")
    if got.spans[0].file != want["file"] or got.spans[-1].file != want["file"]:
      problems.append("file")
    # the recorded span really is where the text lies in the raw source
    raw = paper_dir / got.spans[0].file
    first = latex_sections.strip_comments(
      raw.read_text()[got.spans[0].start : got.spans[0].end]
    ).split()
    if first[:8] != words[:8]:
      problems.append("span")
    row[name] = "ok" if not problems else "+".join(problems)
  return row


def test_labelled_papers_accuracy():
  root = need(LABELLED_LATEX)
  papers = sorted(p for p in root.iterdir() if (p / "labels.json").exists())
  assert papers, "no labelled papers found"
  ok = total = 0
  print(f"\n{'paper':48s} {'abstract':10s} {'introduction':13s} {'conclusion':10s}")
  for p in papers:
    row = _check_labelled(p)
    print(
      f"{p.name[:48]:48s} {row.get('abstract', '-'):10s} {row.get('introduction', '-'):13s} "
      f"{row.get('conclusion', '-'):10s}"
    )
    total += len(row)
    ok += sum(v == "ok" for v in row.values())
  print(f"sections right (start and end): {ok}/{total} = {ok / total:.1%}")
  assert ok / total >= 0.95


# ----------------------------------------------------------------------------- layouts


@pytest.fixture
def bundles(tmp_path):
  folder = tmp_path / "2101.00003"
  folder.mkdir()
  (folder / "ms.tex").write_text(MINI_PAPER)
  (folder / "body.tex").write_text(MINI_BODY)
  single = MINI_PAPER.replace("\\input{body}", MINI_BODY)
  return {
    "gz": write_gz(tmp_path / "2101.00001v2.gz", single),
    "tar": write_tar_gz(
      tmp_path / "2101.00002.tar.gz", {"paper/ms.tex": MINI_PAPER, "paper/body.tex": MINI_BODY}
    ),
    "folder": folder,
    "gz_tar": write_gz(
      tmp_path / "2101.00004.gz", _tar_bytes({"ms.tex": MINI_PAPER, "body.tex": MINI_BODY})
    ),
  }


def _tar_bytes(files):
  import io
  import tarfile

  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


@pytest.mark.parametrize("kind", ["gz", "tar", "folder", "gz_tar"])
def test_every_layout_gives_the_same_sections(bundles, kind):
  paper = latex.extract_paper(bundles[kind])
  assert set(paper.sections) == {"abstract", "introduction", "conclusion"}
  assert paper.title == "A Tiny Test Paper"
  s = paper.sections
  assert s["abstract"].text == "We study tiny galaxies of $10^{9}\\,M_\\odot$. They are small."
  assert s["introduction"].text == "Galaxies are big (see Section). Some are small."
  assert s["conclusion"].title == "Summary and Conclusions"
  assert s["conclusion"].text == ("We conclude that small galaxies exist. $$E = mc^2$$")
  assert paper.missing_inputs == []


def test_ids_and_versions():
  assert sources.paper_id_from_path("x/2504.11526v2.tar.gz") == ("2504.11526", 2)
  assert sources.paper_id_from_path("astro-ph0605151.gz") == ("astro-ph/0605151", 0)
  assert sources.paper_id_from_path("1901.00001") == ("1901.00001", 0)


def test_input_resolution_and_span_offsets(bundles):
  paper = latex.extract_paper(bundles["tar"])
  intro = paper.sections["introduction"]
  assert paper.main_file == "paper/ms.tex"
  (span,) = intro.spans
  assert span.file == "paper/ms.tex"
  assert MINI_PAPER[span.start : span.end].startswith("Galaxies are")
  assert MINI_PAPER[span.start : span.end].rstrip().endswith("Some are small.")


def test_mnras_and_aa_abstracts_and_conclusion_choice():
  files = {
    "a.tex": r"""\documentclass{aa}
\begin{document}
\abstract
% context
{Context here.}
{Aims here.}
{}
\keywords{stars}
\maketitle
\section{Introduction} Intro text.
\section{Discussion} First discussion.
\section{Concluding remarks} The end.
\begin{acknowledgements} Thanks. \end{acknowledgements}
\appendix
\section{Summary of symbols} Not body.
\end{document}"""
  }
  paper = latex.extract_files(files)
  assert paper.sections["abstract"].text == "Context here.\n\nAims here."
  assert paper.sections["conclusion"].title == "Concluding remarks"
  assert paper.sections["conclusion"].text == "The end."


def test_cleaning_rules():
  clean = latex_clean.clean_latex
  assert clean(r"A \textit{b} {\bf c} \href{http://x}{d}~e\footnote{no}.") == "A b c d e."
  assert clean(r"Sch\"{o}nberg and Poincar\'e -- a---b ``q''") == 'Schönberg and Poincaré – a—b "q"'
  assert clean("one\n\n\n  two\nthree") == "one\n\ntwo three"
  assert clean(r"\begin{itemize}\item a \item b\end{itemize}") == "- a\n- b"
  assert clean(r"x \( a_1 \) and \[ b \label{q} \nonumber \]") == "x $a_1$ and $$b$$"
  assert clean(r"\begin{table}\begin{tabular}{c} 1 \end{tabular}\end{table}kept") == "kept"
  assert clean(r"\subsection{Data} The data.") == "Data\n\nThe data."
  assert clean(r"10\% of \citet[see][p.~3]{x,y} \& \citealt{z}") == "10% of &"


# ----------------------------------------------------------------------------- robustness


def _skip_reason(path):
  result = latex.process_paper(path, timeout_s=20)
  assert isinstance(result, latex.Skipped), result
  return result.reason


def test_bad_documents_are_skipped_with_a_reason(tmp_path):
  (tmp_path / "junk.gz").write_bytes(b"\x1f\x8b not really gzip")
  assert _skip_reason(tmp_path / "junk.gz") == "bad_archive"
  write_gz(tmp_path / "bin.gz", bytes(range(256)) * 50)
  assert _skip_reason(tmp_path / "bin.gz") == "binary"
  (tmp_path / "enc.tex").write_bytes("\\documentclass{x}\\begin{document}caf\xe9".encode("latin-1"))
  assert _skip_reason(tmp_path / "enc.tex") == "encoding"
  (tmp_path / "brace.tex").write_text(MINI_PAPER.replace("\\emph{tiny}", "\\emph{tiny"))
  assert _skip_reason(tmp_path / "brace.tex") == "unbalanced_braces"
  (tmp_path / "nosec.tex").write_text("\\documentclass{x}\\begin{document}Hello.\\end{document}")
  assert _skip_reason(tmp_path / "nosec.tex") == "no_sections"
  (tmp_path / "nomain.tex").write_text("\\section{Introduction} text")
  assert _skip_reason(tmp_path / "nomain.tex") == "no_main_file"
  (tmp_path / "empty.gz").write_bytes(b"")
  assert _skip_reason(tmp_path / "empty.gz") == "empty"
  big = tmp_path / "big.tex"
  big.write_text("x" * 2000)
  result = latex.process_paper(big, max_bytes=1000)
  assert result.reason == "too_large"
  assert _skip_reason(tmp_path / "absent.tar.gz") == "missing"
  # a latin-1 file that says so is read
  (tmp_path / "lat.tex").write_bytes(
    b"\\documentclass{x}\\usepackage[latin1]{inputenc}\\begin{document}"
    b"\\begin{abstract}caf\xe9\\end{abstract}\\end{document}"
  )
  assert latex.process_paper(tmp_path / "lat.tex").sections["abstract"].text == "café"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
  "evil",
  [
    "{" * 50000,
    "}" * 50000,
    "\\section{" * 20000,
    "%" * 100000,
    "\\input{a}" * 5000,
    "$" * 30001,
    "\\begin{abstract}" * 10000,
    "\\section{Introduction}" + "\\\\" * 100000,
    "\\section{Introduction}" + "\\label{" * 5000,
    "\\newcommand{\\a}{\\b\\b\\b\\b}" * 3,
  ],
)
def test_pathological_inputs_finish(evil):
  files = {"m.tex": "\\documentclass{x}\\begin{document}" + evil + "\\end{document}"}
  try:
    latex.extract_files(files)
  except latex.ParseError:
    pass


def test_self_multiplying_macros_are_bounded():
  # fully expanded, \\ma would be 30**3 = 27000 x's
  pre = (
    "".join("\\newcommand{\\m%s}{%s}" % (c, ("\\m%s " % n) * 30) for c, n in zip("abc", "bcd"))
    + "\\newcommand{\\md}{x}"
  )
  files = {
    "m.tex": "\\documentclass{x}" + pre + "\\begin{document}\\begin{abstract}\\ma"
    "\\end{abstract}\\end{document}"
  }
  text = latex.extract_files(files).sections["abstract"].text
  assert 0 < text.count("x") <= latex_clean.MAX_EXPANSIONS


_TOKENS = st.sampled_from(
  [
    "\\section{",
    "\\section*{Conclusions}",
    "\\begin{abstract}",
    "\\end{abstract}",
    "{",
    "}",
    "$",
    "$$",
    "\\[",
    "\\]",
    "%",
    "\n",
    "\\\\",
    "\\input{",
    "\\begin{figure}",
    "\\end{figure}",
    "\\textbf{",
    "\\cite{",
    "\\label{",
    "\\abstract",
    "\\appendix",
    "~",
    "--",
    "\\'",
    '\\"',
    "Introduction",
    "word ",
    "\\begin{itemize}",
    "\\item",
    "\\end{itemize}",
    "[",
    "]",
    "\\newcommand{\\x}{",
    "\\x",
    "\\begin{equation}",
    "\\end{equation}",
    "\\(",
    "\\)",
  ]
)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_TOKENS, st.text(max_size=20)), max_size=80))
def test_fuzz_never_crashes(parts):
  body = "".join(parts)
  files = {"m.tex": "\\documentclass{x}\\begin{document}" + body + "\\end{document}"}
  try:
    paper = latex.extract_files(files)
  except latex.ParseError as e:
    assert e.reason
  else:
    for s in paper.sections.values():
      assert isinstance(s.text, str) and s.text.strip()


# ----------------------------------------------------------------------------- brace balance


def _balanced_by_scan(text: str, max_depth: int = 200) -> None:
  """The character loop ``check_balanced`` replaced: the behaviour it must keep."""
  depth, j = 0, 0
  while j < len(text):
    c = text[j]
    if c == "\\":
      j += 2
      continue
    if c == "{":
      depth += 1
      if depth > max_depth:
        raise latex_sections.ParseError("unbalanced_braces", f"nesting deeper than {max_depth}")
    elif c == "}":
      depth -= 1
      if depth < 0:
        raise latex_sections.ParseError("unbalanced_braces", f"unmatched '}}' at offset {j}")
    j += 1
  if depth:
    raise latex_sections.ParseError("unbalanced_braces", f"{depth} group(s) never closed")


def _outcome(check, text: str, max_depth: int = 200) -> str:
  try:
    check(text, max_depth)
  except latex_sections.ParseError as e:
    return str(e)
  return "ok"


_BRACE_CASES = [
  "",
  "plain text",
  "{}",
  "}{",
  "{{}",
  "{}}",
  "\\{",
  "\\}",
  "\\\\{}",
  "\\\\\\{",
  "\\\\\\\\}",
  "a\\",
  "{\\",
  "{\\}",
  "\\a{b}",
  "\\%{",
  "{é{ü}\U0001f600}",
  "\U0001f600}",
  "{" * 200 + "}" * 200,
  "{" * 201 + "}" * 201,
  "{" * 201 + "}" * 300,
  "}" + "{" * 300,
  "{" * 3,
  "x{\\\\}}y",
]


@pytest.mark.parametrize("text", _BRACE_CASES)
def test_check_balanced_matches_the_scan_on_edge_cases(text):
  for max_depth in (0, 1, 200):
    assert _outcome(latex_sections.check_balanced, text, max_depth) == _outcome(
      _balanced_by_scan, text, max_depth
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("{}\\ a%é\n\U0001f600"), max_size=60), st.integers(0, 4))
def test_check_balanced_matches_the_scan_on_brace_soup(text, max_depth):
  assert _outcome(latex_sections.check_balanced, text, max_depth) == _outcome(
    _balanced_by_scan, text, max_depth
  )


def test_check_balanced_matches_the_scan_on_real_papers():
  """Every real .tex file, whole, flattened, and cut at a few places (unbalanced prefixes)."""
  root = need(LABELLED_LATEX)
  texts = [p.read_text(errors="replace") for p in sorted(root.rglob("*.tex"))]
  for paper in sorted(p for p in root.iterdir() if p.is_dir()):
    files = {str(f.relative_to(paper)): f.read_text(errors="replace") for f in paper.rglob("*.tex")}
    if files:
      texts.append(latex_sections.flatten(files, latex_sections.find_main_file(files))[0].text)
  assert len(texts) > 20
  outcomes = set()
  for text in texts:
    for cut in (len(text), len(text) // 3, len(text) // 2 + 7):
      piece = text[:cut]
      for max_depth in (3, 200):
        got = _outcome(latex_sections.check_balanced, piece, max_depth)
        assert got == _outcome(_balanced_by_scan, piece, max_depth)
        outcomes.add(got.split(" ")[0] if got != "ok" else got)
    closed_early = "}" + text
    assert _outcome(latex_sections.check_balanced, closed_early) == _outcome(
      _balanced_by_scan, closed_early
    )
  assert outcomes >= {"ok", "unbalanced_braces:"}
