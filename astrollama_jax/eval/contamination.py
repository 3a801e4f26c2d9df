"""Contamination check: how much of each evaluation item appears verbatim in a training corpus.

An item's contamination is the share of its word 13-grams (the GPT-3 paper's unit) that
occur anywhere in the training corpus. Words are lowercased alphanumeric runs, so
punctuation, LaTeX markup and whitespace differences do not hide a copy. Items whose share
exceeds a threshold are flagged; the scoring tasks can then report them or drop them.

The index holds only the evaluation items' n-grams (small); the training corpus is
streamed once and each of its n-grams is looked up, so a corpus of any size fits.
N-grams never span two documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import os
import re
from typing import Any

import numpy as np
from tqdm import tqdm

from astrollama_jax.eval import common

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int) -> np.ndarray:
  """Hashes of the word n-grams of ``text`` (empty when it has fewer than n words)."""
  w = words(text)
  return np.fromiter(
    (hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1)),
    np.int64,
    count=max(0, len(w) - n + 1),
  )


def _strings(x: Any) -> Iterator[str]:
  """Every string inside a JSON value (so chat records count all their turns)."""
  if isinstance(x, str):
    yield x
  elif isinstance(x, dict):
    for v in x.values():
      yield from _strings(v)
  elif isinstance(x, list):
    for v in x:
      yield from _strings(v)


def iter_corpus(spec: str, split: str = "train") -> Iterator[str]:
  """Documents of a training corpus: a JSONL file (text fields, or every string of a record,
  e.g. chat turns) or a prepared ArrayRecord dataset directory (its ``split``)."""
  if os.path.isdir(spec):
    from astrollama_jax.data.corpus import read as corpus

    source = corpus.read_split(spec, split)
    for i in range(len(source)):
      text = source[i]["text"]
      yield text.decode("utf-8") if isinstance(text, bytes) else text
    return
  for _, rec in common.read_jsonl(spec):
    field = next((f for f in common.TEXT_FIELDS if isinstance(rec.get(f), str)), None)
    if field is not None:
      yield rec[field]
    else:
      yield "\n".join(_strings(rec))


@dataclasses.dataclass
class Report:
  """Per item: share of n-grams found in the corpus, number of n-grams, flagged."""

  shares: np.ndarray
  ngrams: np.ndarray
  flagged: np.ndarray
  threshold: float
  n: int

  def summary(self) -> dict[str, Any]:
    return {
      "items": len(self.shares),
      "flagged": int(self.flagged.sum()),
      "mean_share": float(self.shares.mean()) if len(self.shares) else float("nan"),
      "threshold": self.threshold,
      "ngram": self.n,
    }


class Checker:
  """Contamination of a list of item texts against one or more training corpora."""

  def __init__(
    self,
    train_specs: Sequence[str],
    n: int = 13,
    threshold: float = 0.5,
    split: str = "train",
    drop: bool = False,
    progress: bool = True,
  ):
    if n < 1:
      raise ValueError(f"n-gram length must be >= 1, got {n}")
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold must be a share in [0, 1], got {threshold}")
    self.train_specs = list(train_specs)
    self.n, self.threshold, self.split, self.drop = n, threshold, split, drop
    self.progress = progress

  def check(self, texts: Sequence[str]) -> Report:
    item_grams = [ngram_hashes(t, self.n) for t in texts]
    wanted = set(np.concatenate(item_grams).tolist()) if item_grams else set()
    found = self.scan(self.train_specs_iter(), wanted)
    found_arr = np.fromiter(found, np.int64, count=len(found))
    shares = np.array([np.isin(g, found_arr).mean() if len(g) else 0.0 for g in item_grams])
    counts = np.array([len(g) for g in item_grams])
    return Report(shares, counts, shares > self.threshold, self.threshold, self.n)

  def annotate(self, docs: list[dict]) -> tuple[list[dict], int]:
    """Mark each ``{"text": ...}`` doc with its share and flag; drop flagged ones if asked.

    Returns the docs to score and how many were dropped.
    """
    report = self.check([d["text"] for d in docs])
    for d, share, flag in zip(docs, report.shares, report.flagged):
      d["contamination"], d["flagged"] = float(share), bool(flag)
    if not self.drop:
      return docs, 0
    return [d for d in docs if not d["flagged"]], int(report.flagged.sum())

  def train_specs_iter(self) -> Iterable[str]:
    for spec in self.train_specs:
      yield from iter_corpus(spec, self.split)

  def scan(self, documents: Iterable[str], wanted: set[int]) -> set[int]:
    """The subset of ``wanted`` n-gram hashes that occur in ``documents``."""
    found: set[int] = set()
    if not wanted:
      return found
    for doc in tqdm(
      documents, desc="contamination scan", unit="doc", disable=not self.progress, leave=False
    ):
      found.update(wanted.intersection(ngram_hashes(doc, self.n).tolist()))
      if len(found) == len(wanted):
        break
    return found


def item_text(item: dict) -> str:
  """The text of an evaluation item to check: a document's text, or a question and its options."""
  if "text" in item:
    return item["text"]
  parts = [item.get("question", "")] + [item.get(k, "") for k in ("A", "B", "C", "D")]
  return "\n".join(p for p in parts if p)


def run(
  items: Sequence[dict], checker: Checker, output_dir: str, label: str, data_name: str = ""
) -> dict:
  """The ``contamination`` task: a per-item report file and a summary."""
  report = checker.check([item_text(it) for it in items])
  records = [
    {"id": it.get("id", str(i)), "share": float(s), "ngrams": int(c), "flagged": bool(f)}
    for i, (it, s, c, f) in enumerate(zip(items, report.shares, report.ngrams, report.flagged))
  ]
  s = report.summary()
  rows = [
    {
      "data": data_name,
      "items": s["items"],
      "flagged": s["flagged"],
      "mean_share": s["mean_share"],
      "threshold": s["threshold"],
      "ngram": s["ngram"],
    }
  ]
  rows += [
    {"data": f"  {r['id']}", "items": 1, "flagged": 1, "mean_share": r["share"]}
    for r in records
    if r["flagged"]
  ][:20]
  metrics = {
    "contamination/flagged": s["flagged"],
    "contamination/mean_share": s["mean_share"],
    "contamination/flagged_share": s["flagged"] / max(1, s["items"]),
  }
  extra = {"train_data": checker.train_specs, **s}
  return common.finish("contamination", output_dir, label, "", metrics, rows, records, extra)
