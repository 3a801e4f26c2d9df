"""Paper embeddings as AstroLLaMA made them, nearest-paper search, and a measure of their quality.

An embedding is the mean of the last layer's hidden states (after the final RMSNorm, i.e.
transformers' ``hidden_states[-1]``) over the tokens after BOS. Texts longer than the
context are cut to ``max_len`` tokens.

Quality, when the records carry arXiv ``categories``: for each paper, the share of its k
nearest neighbours (cosine) with the same primary category, next to the rate expected by
chance. A model that understands astro text groups galaxies with galaxies and exoplanets with
exoplanets; the chance rate keeps a skewed category mix from looking like skill.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import common
from astrollama_jax.eval.scoring import Scorer


def embed_texts(
  scorer: Scorer, tokenizer: Tokenizer, texts: Sequence[str], desc: str = "embedding"
) -> np.ndarray:
  """[N, dim] float32 embeddings (mean final hidden state over the tokens after BOS)."""
  ids = [t[: scorer.max_len] for t in tokenizer.encode_batch(texts, bos=True)]
  for i, t in enumerate(ids):
    if len(t) < 2:
      raise common.EvalDataError(f"text {i} is empty: nothing after BOS to embed")
  return scorer.embeddings(ids, skip_first=1, desc=desc)


def normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of two [N, D] arrays."""
  return np.sum(normalise(a) * normalise(b), axis=-1)


def nearest(embeddings: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices and cosines of the k rows of ``embeddings`` nearest to ``query`` [D]."""
  sims = normalise(embeddings) @ normalise(query[None])[0]
  order = np.argsort(-sims, kind="stable")[:k]
  return order, sims[order]


def knn_category_agreement(
  embeddings: np.ndarray, categories: Sequence[str], k: int
) -> tuple[float, float]:
  """(share of k nearest neighbours with the same category, the same share by chance)."""
  n = len(categories)
  if n <= k:
    return float("nan"), float("nan")
  e = normalise(embeddings)
  sims = e @ e.T
  np.fill_diagonal(sims, -np.inf)
  nn = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  cats = np.asarray(categories)
  agree = float((cats[nn] == cats[:, None]).mean())
  _, counts = np.unique(cats, return_counts=True)
  chance = float(np.sum(counts * (counts - 1)) / (n * (n - 1)))
  return agree, chance


def save(path: str, ids: Sequence[str], titles: Sequence[str], embeddings: np.ndarray) -> None:
  if not common.is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(
    tmp,
    ids=np.asarray(ids, dtype=str),
    titles=np.asarray(titles, dtype=str),
    embeddings=np.asarray(embeddings, np.float32),
  )
  os.replace(tmp, path)


def load(path: str) -> tuple[list[str], list[str], np.ndarray]:
  with np.load(path) as f:
    return f["ids"].tolist(), f["titles"].tolist(), f["embeddings"]


def run(
  setup: common.TaskSetup,
  data: Sequence[str],
  *,
  query: str | None = None,
  neighbours: int = 5,
  embeddings_file: str | None = None,
  split: str = "validation",
) -> dict:
  """The ``embed`` task: embed ``data`` (or reuse ``embeddings_file``), then answer ``query``."""
  model, tokenizer, limit = setup.model, setup.tokenizer, setup.limit
  scorer = setup.scorer()
  path = embeddings_file or os.path.join(setup.output_dir, "embeddings.npz")
  metrics: dict[str, float] = {}
  if embeddings_file and os.path.exists(embeddings_file):
    ids, titles, emb = load(embeddings_file)
    if emb.shape[1] != model.cfg.dim:
      raise common.EvalDataError(
        f"{embeddings_file} holds {emb.shape[1]}-d embeddings but the model's are {model.cfg.dim}-d"
      )
  else:
    records = [r for spec in data for r in common.read_texts(spec, split=split, limit=limit)]
    if not records:
      raise common.EvalDataError(f"no texts to embed in {list(data)}")
    ids = [r["id"] for r in records]
    titles = [r.get("title") or "" for r in records]
    emb = embed_texts(scorer, tokenizer, [r["text"] for r in records])
    save(path, ids, titles, emb)
    cats = [(r.get("categories") or [None])[0] for r in records]
    if all(cats):
      agree, chance = knn_category_agreement(emb, cats, neighbours)
      metrics.update({"embed/knn_category_agreement": agree, "embed/knn_chance": chance})
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(emb), (2, min(10000, len(emb) ** 2)))
    keep = a != b
    if keep.any():
      metrics["embed/mean_pair_cosine"] = float(cosine(emb[a[keep]], emb[b[keep]]).mean())
  metrics["embed/count"] = len(ids)
  rows: list[dict] = []
  extra: dict = {"dim": int(emb.shape[1])}
  if query:
    q = embed_texts(scorer, tokenizer, [query], desc="query")[0]
    idx, sims = nearest(emb, q, neighbours)
    rows = [
      {"rank": r + 1, "id": ids[i], "cosine": float(s), "title": titles[i]}
      for r, (i, s) in enumerate(zip(idx, sims))
    ]
    extra["query"] = query
  else:
    rows = [
      {
        "papers": len(ids),
        "dim": int(emb.shape[1]),
        **{k.split("/", 1)[1]: v for k, v in metrics.items() if k != "embed/count"},
      }
    ]
  return setup.finish(
    "embed",
    metrics,
    rows,
    extra=extra,
    files={"embeddings": path},
  )
