"""Shared helpers of the test suite: where the repository and the real data are, small files
(tar.gz, gz, JSONL, a LaTeX paper), a free loopback port, the demo corpus prepared.

Training runs in subprocesses: ``helpers_train``; models and references: ``helpers_models``;
a model server: ``helpers_serve``.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import tarfile

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASTROLLAMA_SHARED_DATA") or REPO.parent / "shared" / "data")
LABELLED_LATEX = SHARED_DATA / "latex"
ABSTRACTS = SHARED_DATA / "arxiv-astro-ph" / "abstracts.jsonl"
TOKENIZER = SHARED_DATA / "tokenizer" / "llama2" / "tokenizer.model"
DEMO_CORPUS = REPO / "data" / "demo_corpus"


def need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"shared data not present: {path}")
  return path


def abstracts_subset(tmp_dir: Path, n: int = 300) -> Path:
  """The first ``n`` lines of the shared abstracts.jsonl, as a file of its own."""
  src = need(ABSTRACTS)
  out = tmp_dir / "abstracts_subset.jsonl"
  with open(src, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
    g.writelines(itertools.islice(f, n))
  return out


def write_tar_gz(path: Path, files: dict[str, str]) -> Path:
  with tarfile.open(path, "w:gz") as tar:
    for name, text in sorted(files.items()):
      data = text.encode("utf-8")
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = 0
      tar.addfile(info, io.BytesIO(data))
  return path


def write_gz(path: Path, text: str | bytes) -> Path:
  data = text.encode("utf-8") if isinstance(text, str) else text
  with open(path, "wb") as f:
    f.write(gzip.compress(data, mtime=0))
  return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


MINI_PAPER = r"""\documentclass{aastex631}
\newcommand{\msun}{M_\odot}
\begin{document}
\title{A Tiny Test Paper}
\begin{abstract}
We study \emph{tiny} galaxies of $10^{9}\,\msun$ \citep{a,b}. % a comment
They are small.
\end{abstract}
\section{Introduction}\label{sec:intro}
Galaxies are \textbf{big} (see Section~\ref{sec:c}).
\begin{figure}\caption{Not text.}\end{figure}
Some are small.
\input{body}
\section*{Summary and Conclusions}
We conclude that small galaxies exist.
\begin{equation} E = mc^2 \label{eq:e} \end{equation}
\acknowledgments We thank nobody.
\bibliography{refs}
\end{document}
"""
MINI_BODY = r"""\section{Methods}
We looked at them.
"""


# --- loopback ports ------------------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- the demo corpus, prepared -------------------------------------------------------------


def prepare_demo_corpus(out) -> Path:
  """``prepare`` the repository's demo corpus (15% validation) into ``out``."""
  subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "prepare",
      "--source=data/demo_corpus",
      f"--output={out}",
      "--validation_fraction=0.15",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
    timeout=120,
  )
  return Path(out)


# --- arXiv bulk tars ---------------------------------------------------------------------

SINGLE = MINI_PAPER.replace("\\input{body}", MINI_BODY)  # a paper in one file


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
