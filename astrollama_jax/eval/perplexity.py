"""Perplexity on astro text: token-weighted NLL per corpus and per section, with a 95% interval.

Each document is encoded with BOS (no EOS) and every token after BOS is scored exactly once.
Documents longer than the context go through sliding windows (``scoring.window_requests``):
each window after the first scores only its ``stride`` newest tokens, so those tokens keep
at least ``max_len - stride`` tokens of context. Perplexity is exp(sum NLL / sum tokens)
over a group (corpus, section, or everything); its interval is a bootstrap over documents.

``by="month"`` adds a row per calendar month of the documents' dates (the record's ``date``,
else the month an arXiv id names): knowledge recency. A model trained on an older corpus sees
newer papers as less predictable; a monthly corpus update (``prepare --update``, a
``since:DATE`` mixture) should lower the perplexity of the newest months more than of the old.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import re

import numpy as np

from astrollama_jax.data.corpus.metadata import date_from_id
from astrollama_jax.eval import common, stats
from astrollama_jax.eval.scoring import Scorer, window_requests

COLUMNS = ("corpus", "section", "docs", "tokens", "nll", "ppl", "ppl_lo", "ppl_hi")
BY = ("month",)
_MONTH_RE = re.compile(r"(\d{4})-(\d{2})")


def document_month(doc: dict, corpus: str) -> str:
  """YYYY-MM of the document's ``date`` field, else of its arXiv id; neither is an error."""
  date = str(doc.get("date") or "") or date_from_id(str(doc.get("id") or ""))
  m = _MONTH_RE.match(date)
  if not m or not 1 <= int(m.group(2)) <= 12:
    raise common.EvalDataError(
      f"{corpus}: document {doc.get('id')!r} has no usable date ({date!r}) for grouping by"
      " month: give each record a 'date' (YYYY-MM[-DD]) or an arXiv id"
    )
  return m.group(0)


def document_nll(
  scorer: Scorer, token_lists: Sequence[Sequence[int]], stride: int, desc: str = "perplexity"
) -> tuple[np.ndarray, np.ndarray]:
  """(summed NLL, number of scored tokens) per document, windows of ``scorer.max_len``."""
  requests, owner = [], []
  for d, ids in enumerate(token_lists):
    for req in window_requests(ids, scorer.max_len, stride):
      requests.append(req)
      owner.append(d)
  logprobs, _ = scorer.logprobs(requests, desc=desc)
  nll = np.zeros(len(token_lists), np.float64)
  count = np.zeros(len(token_lists), np.int64)
  for d, lp in zip(owner, logprobs):
    nll[d] -= lp.sum()
    count[d] += len(lp)
  return nll, count


def _row(corpus: str, section: str, nll: np.ndarray, count: np.ndarray, n_boot: int, seed: int):
  total_tok = int(count.sum())
  mean = float(nll.sum() / total_tok) if total_tok else float("nan")
  lo, hi = stats.perplexity_ci(nll, count, n_boot, seed)
  return {
    "corpus": corpus,
    "section": section,
    "docs": len(nll),
    "tokens": total_tok,
    "nll": mean,
    "ppl": float(np.exp(mean)),
    "ppl_lo": lo,
    "ppl_hi": hi,
  }


def _add_metrics(metrics: dict, key: str, row: dict) -> None:
  metrics.update({key: row["ppl"], f"{key}_lo": row["ppl_lo"], f"{key}_hi": row["ppl_hi"]})


def run(
  setup: common.TaskSetup,
  data: Sequence[str],
  *,
  stride: int = 0,
  split: str = "validation",
  n_boot: int = 1000,
  seed: int = 0,
  checker=None,
  by: str | None = None,
) -> dict:
  """The ``perplexity`` task over one or more corpora (JSONL files or prepared datasets);
  ``by="month"`` also groups each corpus (and, over several, all of them) by month."""
  if by is not None and by not in BY:
    raise ValueError(f"perplexity can group by {', '.join(BY)}, not {by!r}")
  tokenizer, limit = setup.tokenizer, setup.limit
  scorer = setup.scorer()
  stride = stride or max(1, scorer.max_len // 2)
  rows, items, all_nll, all_cnt = [], [], [], []
  metrics: dict[str, float] = {}
  excluded = 0
  all_months: list[str] = []
  for spec in data:
    name = common.corpus_name(spec)
    docs = common.read_texts(spec, split=split, limit=limit)
    if checker is not None:
      docs, dropped = checker.annotate(docs)
      excluded += dropped
    if not docs:
      raise common.EvalDataError(f"{spec}: no documents to score")
    months = [document_month(d, spec) for d in docs] if by == "month" else [None] * len(docs)
    all_months += months
    ids = tokenizer.encode_batch([d["text"] for d in docs], bos=True)
    nll, cnt = document_nll(scorer, ids, stride, desc=f"perplexity {name}")
    all_nll.append(nll)
    all_cnt.append(cnt)
    rows.append(_row(name, "all", nll, cnt, n_boot, seed))
    _add_metrics(metrics, f"ppl/{name}", rows[-1])
    by_section = collections.defaultdict(list)
    for i, d in enumerate(docs):
      if d.get("section"):
        by_section[d["section"]].append(i)
    for section, idx in sorted(by_section.items()):
      rows.append(_row(name, section, nll[idx], cnt[idx], n_boot, seed))
      _add_metrics(metrics, f"ppl/{name}/{section}", rows[-1])
    if by == "month":
      rows += _month_rows(name, f"ppl/{name}/month", months, nll, cnt, n_boot, seed, metrics)
    for d, n, c, month in zip(docs, nll, cnt, months):
      items.append(
        {
          "corpus": name,
          "id": d["id"],
          "section": d.get("section"),
          "tokens": int(c),
          "nll_sum": float(n),
          "ppl": float(np.exp(n / max(c, 1))),
          **({"month": month} if month else {}),
          **({"contamination": d["contamination"]} if "contamination" in d else {}),
        }
      )
  nll, cnt = np.concatenate(all_nll), np.concatenate(all_cnt)
  total = _row("total", "all", nll, cnt, n_boot, seed)
  if len(data) > 1:
    rows.append(total)
    if by == "month":
      rows += _month_rows("total", "ppl/month", all_months, nll, cnt, n_boot, seed, metrics)
  metrics.update(
    {"ppl": total["ppl"], "nll": total["nll"], "ppl_lo": total["ppl_lo"], "ppl_hi": total["ppl_hi"]}
  )
  extra = {
    "max_len": scorer.max_len,
    "stride": stride,
    "data": list(data),
    "tokens": int(cnt.sum()),
    "docs": len(nll),
  }
  columns = COLUMNS
  if by == "month":
    extra["by"] = by
    columns = COLUMNS[:2] + ("month",) + COLUMNS[2:]
    for row in rows:
      row.setdefault("month", "all")
  extra.update(common.contamination_note(checker, excluded))
  return setup.finish("perplexity", metrics, rows, items, extra, columns)


def _month_rows(corpus, key, months, nll, cnt, n_boot, seed, metrics) -> list[dict]:
  """A row (and metrics ``<key>/YYYY-MM``) per month, oldest first."""
  rows = []
  months = np.asarray(months)
  for month in sorted(set(months.tolist())):
    idx = np.flatnonzero(months == month)
    rows.append({**_row(corpus, "all", nll[idx], cnt[idx], n_boot, seed), "month": month})
    _add_metrics(metrics, f"{key}/{month}", rows[-1])
  return rows
