"""Abstract completion, as AstroLLaMA was judged: give the first part, generate the rest, compare.

For each text the prompt is its first ``prefix_frac`` (by characters, moved to the nearest
sentence boundary); the model generates as many tokens as the real continuation has (capped
by ``max_new_tokens`` and the context; the reference is cut to the same length). Two scores:

(a) cosine similarity between embeddings of the generated and of the real continuation.
    AstroLLaMA used OpenAI's ada embeddings; with no network here the default embedder is
    the evaluated model itself (``embed``: mean last hidden state after BOS), or any other
    checkpoint given as ``embedder``. An empty generation scores 0. ``cosine_shuffled``
    pairs each generation with another text's continuation: the level similarity reaches
    without any real match, to read (a) against.
(b) perplexity of the real continuation given the prompt (``scoring``, teacher forced).

Every sample (prompt, reference, generation, both scores) goes to ``completion_samples.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
import re

from absl import logging
import numpy as np
from tqdm import tqdm

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import common, embed, stats
from astrollama_jax.eval.scoring import Request, Scorer

COLUMNS = (
  "data",
  "samples",
  "cosine",
  "cos_lo",
  "cos_hi",
  "cos_shuffled",
  "ppl",
  "ppl_lo",
  "ppl_hi",
)

_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9$\\(\[])")
_ABBREVIATIONS = {
  "e.g",
  "i.e",
  "al",
  "fig",
  "figs",
  "eq",
  "eqs",
  "cf",
  "vs",
  "approx",
  "resp",
  "ref",
  "refs",
  "sect",
  "sec",
  "no",
  "dr",
  "prof",
  "etc",
  "tab",
  "ca",
  "ie",
  "eg",
}


def sentence_boundaries(text: str) -> list[int]:
  """Character offsets where a new sentence starts (not after 'et al.', 'Fig.', initials...)."""
  out = []
  for m in _BOUNDARY.finditer(text):
    before = text[: m.start()].rsplit(None, 1)[-1] if text[: m.start()].strip() else ""
    word = before.lstrip("([{\"'").lower()
    if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
      continue
    out.append(m.end())
  return out


def split_text(text: str, frac: float) -> tuple[str, str] | None:
  """(prefix, continuation) cut at the sentence boundary nearest ``frac`` of the characters."""
  text = text.strip()
  cuts = sentence_boundaries(text)
  if not cuts:
    return None
  cut = min(cuts, key=lambda c: (abs(c - frac * len(text)), c))
  return text[:cut].rstrip(), text[cut:].strip()


def run(
  setup: common.TaskSetup,
  data: Sequence[str],
  *,
  embedder: common.Model | None = None,
  prefix_frac: float = 0.5,
  max_new_tokens: int = 512,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  gen_batch_size: int = 16,
  split: str = "validation",
  n_boot: int = 1000,
  seed: int = 0,
  checker=None,
) -> dict:
  """The ``completion`` task over one or more JSONL files / prepared datasets."""
  from astrollama_jax.generation import generate

  model, tokenizer, limit = setup.model, setup.tokenizer, setup.limit
  batch_size, progress = setup.batch_size, setup.progress

  if not 0.0 < prefix_frac < 1.0:
    raise ValueError(f"prefix_frac must be in (0, 1), got {prefix_frac}")
  scorer = setup.scorer()
  emb_model = embedder or model
  emb_tok = Tokenizer(emb_model.tokenizer_path) if embedder else tokenizer
  emb_scorer = (
    scorer
    if embedder is None
    else Scorer(
      emb_model.cfg, emb_model.params, emb_model.mesh, batch_size=batch_size, progress=progress
    )
  )

  samples, skipped, rows = [], {}, []
  per_data: list[tuple[str, int, int]] = []
  for spec in data:
    name = common.corpus_name(spec)
    docs = common.read_texts(spec, split=split, limit=limit)
    if checker is not None:
      docs, dropped = checker.annotate(docs)
      if checker.drop:
        skipped["contaminated"] = skipped.get("contaminated", 0) + dropped
    start = len(samples)
    for d in docs:
      parts = split_text(d["text"], prefix_frac)
      if parts is None:
        skipped["one_sentence"] = skipped.get("one_sentence", 0) + 1
        continue
      prompt = tokenizer.encode(parts[0], bos=True)
      cont = tokenizer.encode(parts[1], bos=False)
      n_new = min(
        len(cont),
        max_new_tokens,
        model.cfg.max_seq_len - len(prompt),
        scorer.max_len + 1 - len(prompt),
      )
      if n_new < 1:
        skipped["prompt_too_long"] = skipped.get("prompt_too_long", 0) + 1
        continue
      ref_ids = cont[:n_new]
      samples.append(
        {
          "data": name,
          "id": d["id"],
          "title": d.get("title"),
          "prefix": parts[0],
          "reference": parts[1] if n_new == len(cont) else tokenizer.decode(ref_ids),
          "_prompt": prompt,
          "_ref": ref_ids,
          **({"contamination": d["contamination"]} if "contamination" in d else {}),
        }
      )
    per_data.append((name, start, len(samples)))
  if not samples:
    raise common.EvalDataError(
      f"no text in {list(data)} could be split into prompt and continuation (skipped: {skipped})"
    )
  if skipped:
    logging.warning("completion: skipped %s", skipped)

  # Generate, longest budgets together so a batch wastes few steps; cut each to its budget.
  order = sorted(range(len(samples)), key=lambda i: len(samples[i]["_ref"]))
  chunks = [order[i : i + gen_batch_size] for i in range(0, len(order), gen_batch_size)]
  for chunk in tqdm(chunks, desc="generating", unit="batch", disable=not progress, leave=False):
    budget = max(len(samples[i]["_ref"]) for i in chunk)
    result = generate(
      model.cfg,
      model.params,
      [samples[i]["_prompt"] for i in chunk],
      budget,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      eos_id=tokenizer.eos_id,
      mesh=model.mesh,
    )
    for i, ids, reason in zip(chunk, result.tokens, result.finish_reasons):
      n = len(samples[i]["_ref"])
      samples[i]["_gen"] = ids[:n]
      samples[i]["finish"] = "length" if len(ids) >= n else reason
      samples[i]["generated"] = tokenizer.decode(ids[:n])
      samples[i]["generated_tokens"] = len(samples[i]["_gen"])

  # (b) teacher-forced NLL of the real continuation given the prompt.
  lps, _ = scorer.logprobs(
    [Request(s["_prompt"], s["_ref"]) for s in samples], desc="continuation nll"
  )
  # (a) embeddings of generated and real continuations.
  gen_texts = [s["generated"] for s in samples]
  nonempty = [i for i, t in enumerate(gen_texts) if emb_tok.encode(t, bos=False)]
  e_ref = embed.embed_texts(
    emb_scorer, emb_tok, [s["reference"] for s in samples], desc="embedding references"
  )
  e_gen = np.zeros_like(e_ref)
  if nonempty:
    e_gen[nonempty] = embed.embed_texts(
      emb_scorer, emb_tok, [gen_texts[i] for i in nonempty], desc="embedding generations"
    )
  cos = np.zeros(len(samples))
  cos[nonempty] = embed.cosine(e_gen[nonempty], e_ref[nonempty])
  shuffled = np.zeros(len(samples))
  if len(samples) > 1:
    other = np.roll(np.arange(len(samples)), 1)
    shuffled[nonempty] = embed.cosine(e_gen[nonempty], e_ref[other[nonempty]])

  nll = np.array([-lp.sum() for lp in lps])
  ntok = np.array([len(lp) for lp in lps])
  for s, c, c_sh, n, t in zip(samples, cos, shuffled, nll, ntok):
    s.update(
      {
        "cosine": float(c),
        "cosine_shuffled": float(c_sh),
        "tokens": int(t),
        "continuation_nll": float(n),
        "continuation_ppl": float(np.exp(n / t)),
      }
    )
  for name, a, b in per_data:
    if b > a:
      rows.append(_row(name, cos[a:b], shuffled[a:b], nll[a:b], ntok[a:b], n_boot, seed))
  total = _row("total", cos, shuffled, nll, ntok, n_boot, seed)
  if len(rows) > 1:
    rows.append(total)
  metrics = {
    "completion/cosine": total["cosine"],
    "completion/cosine_lo": total["cos_lo"],
    "completion/cosine_hi": total["cos_hi"],
    "completion/cosine_shuffled": total["cos_shuffled"],
    "completion/ppl": total["ppl"],
    "completion/ppl_lo": total["ppl_lo"],
    "completion/ppl_hi": total["ppl_hi"],
  }
  keys = (
    "data",
    "id",
    "title",
    "prefix",
    "reference",
    "generated",
    "cosine",
    "cosine_shuffled",
    "continuation_ppl",
    "continuation_nll",
    "tokens",
    "generated_tokens",
    "finish",
    "contamination",
  )
  records = [{k: s[k] for k in keys if k in s} for s in samples]
  extra = {
    "samples": len(samples),
    "skipped": skipped,
    "prefix_frac": prefix_frac,
    "temperature": temperature,
    "top_k": top_k,
    "top_p": top_p,
    "seed": seed,
    "embedder": embedder.checkpoint if embedder else "self",
    "data": list(data),
    "empty_generations": len(samples) - len(nonempty),
  }
  return setup.finish(
    "completion",
    metrics,
    rows,
    records,
    extra,
    COLUMNS,
    kind="samples",
  )


def _row(name, cos, shuffled, nll, ntok, n_boot, seed) -> dict:
  lo, hi = stats.mean_ci(cos, n_boot, seed)
  p_lo, p_hi = stats.perplexity_ci(nll, ntok, n_boot, seed)
  return {
    "data": name,
    "samples": len(cos),
    "cosine": float(np.mean(cos)),
    "cos_lo": lo,
    "cos_hi": hi,
    "cos_shuffled": float(np.mean(shuffled)),
    "ppl": float(np.exp(nll.sum() / max(ntok.sum(), 1))),
    "ppl_lo": p_lo,
    "ppl_hi": p_hi,
  }
