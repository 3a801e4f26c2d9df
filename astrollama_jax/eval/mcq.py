"""Multiple-choice questions: accuracy by option log-likelihood and by answer-letter probability.

Two ways to ask a base model, both standard and both reported:

* ``loglik`` (cloze): "Question: ...\\nAnswer:" followed by each option's text; the option with
  the highest total log-probability wins (``loglik``), or the highest per-token mean
  (``loglik_norm``, so long options are not penalised for their length).
* ``letter`` (MMLU): the question with lettered options, then "Answer:"; the option whose
  letter (" A", " B", ...) is most probable as the next token wins. The probability of the
  right letter, renormalised over the option letters, is reported too.

Ties are real (identical options give identical requests, which are scored once): a question
whose top score is shared by k options earns 1/k if the answer is among them. Accuracy comes
with a 95% Wilson interval.

Inputs: JSONL records {question, A, B, C, D, answer (letter or 0-based index), id?, subject?},
a JSON file holding a list of such records, or MMLU-style CSV rows (question, options..., answer
letter; no header; the subject is the file name without ``_test``/``_dev``/``_val``).

AstroMLab-1's public layout ({question_id, question, A..D}, the answer withheld) is read as is:
``question_id`` names the question, and a file whose records have no ``answer`` is not scored.
Its questions get a prediction by the letter method, the one AstroMLab uses for base models,
and ``mcq_predictions.jsonl`` holds, per question, the id, the predicted letter and each letter's
log-probability, ready to submit (the file is written for answered questions too).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os

from absl import logging
import numpy as np

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import common, stats
from astrollama_jax.eval.scoring import Request, Scorer

LETTERS = "ABCDEFGHIJ"
METHODS = {
  "loglik": ("loglik", "loglik_norm"),
  "letter": ("letter",),
  "all": ("loglik", "loglik_norm", "letter"),
}
COLUMNS = ("data", "method", "questions", "correct", "acc", "acc_lo", "acc_hi")


# --- reading -------------------------------------------------------------------------------------


def _answer_index(value, n_options: int, where: str) -> int:
  if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_options:
    return value
  if isinstance(value, str) and value.strip().upper() in LETTERS[:n_options] and value.strip():
    return LETTERS.index(value.strip().upper())
  raise common.EvalDataError(
    f"{where}: answer {value!r} is not one of "
    f"{', '.join(LETTERS[:n_options])} (or an index below {n_options})"
  )


def subject_from_path(path: str) -> str:
  name = common.corpus_name(path)
  for suffix in ("_test", "_dev", "_val", "_validation"):
    if name.endswith(suffix):
      name = name[: -len(suffix)]
  return name.replace("_", " ")


def looks_like_mcq(path: str) -> bool:
  """A JSONL (or JSON list) file whose first record has a ``question`` field."""
  if not path.endswith((".jsonl", ".json")) or not os.path.isfile(path):
    return False
  for _, rec in _records(path):
    return "question" in rec
  return False


def _records(path: str):
  """(line or position, record) from a JSONL file, or from a JSON file holding a list."""
  if not path.endswith(".json"):
    yield from common.read_jsonl(path)
    return
  try:
    with open(path, encoding="utf-8") as f:
      recs = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise common.EvalDataError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(recs, list):
    raise common.EvalDataError(f"{path}: expected a JSON list of questions")
  for n, rec in enumerate(recs, 1):
    if not isinstance(rec, dict):
      raise common.EvalDataError(f"{path}: item {n} is a {type(rec).__name__}, not an object")
    yield n, rec


def read_questions(path: str, limit: int = 0) -> list[dict]:
  """Questions as dicts {id, subject, question, options: [...], answer: index, A, B, ...};
  ``answer`` is None where the file withholds it (all of its records, or none, must)."""
  out = []
  if path.endswith(".csv"):
    subject = subject_from_path(path)
    for n, row in common.read_csv_rows(path):
      if n == 1 and [c.strip().lower() for c in row[:1]] == ["question"]:
        continue  # a header row
      if len(row) < 4:
        raise common.EvalDataError(
          f"{path}:{n}: expected question, >= 2 options and the answer; got {len(row)} columns"
        )
      options = row[1:-1]
      out.append(
        _question(
          f"{common.corpus_name(path)}:{n}",
          subject,
          row[0],
          options,
          _answer_index(row[-1], len(options), f"{path}:{n}"),
        )
      )
      if limit and len(out) >= limit:
        break
    return out
  withheld = None
  for n, rec in _records(path):
    where = f"{path}:{n}"
    if not isinstance(rec.get("question"), str):
      raise common.EvalDataError(f"{where}: no 'question' string")
    letters = [c for c in LETTERS if c in rec]
    if len(letters) < 2 or letters != list(LETTERS[: len(letters)]):
      raise common.EvalDataError(
        f"{where}: options must be fields A, B, ... in order; found {letters or 'none'}"
      )
    options = [str(rec[c]) for c in letters]
    if withheld is None:
      withheld = "answer" not in rec
    elif withheld != ("answer" not in rec):
      raise common.EvalDataError(
        f"{where}: {'an' if withheld else 'no'} 'answer' field, unlike the first record"
        " (a file gives every answer or withholds every one)"
      )
    qid = rec.get("id", rec.get("question_id", f"{common.corpus_name(path)}:{n}"))
    out.append(
      _question(
        str(qid),
        rec.get("subject") or "",
        rec["question"],
        options,
        None if withheld else _answer_index(rec["answer"], len(options), where),
      )
    )
    if limit and len(out) >= limit:
      break
  return out


def _question(
  qid: str, subject: str, question: str, options: list[str], answer: int | None
) -> dict:
  return {
    "id": qid,
    "subject": subject,
    "question": question.strip(),
    "options": [o.strip() for o in options],
    "answer": answer,
    **{LETTERS[i]: o for i, o in enumerate(options)},
  }


# --- prompts -------------------------------------------------------------------------------------


def header(subject: str) -> str:
  about = f" about {subject}" if subject else ""
  return f"The following are multiple choice questions (with answers){about}.\n\n"


def letter_block(q: dict, with_answer: bool) -> str:
  lines = [q["question"]] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(q["options"])]
  answer = f" {LETTERS[q['answer']]}\n\n" if with_answer else ""
  return "\n".join(lines) + "\nAnswer:" + answer


def cloze_block(q: dict, with_answer: bool) -> str:
  answer = f" {q['options'][q['answer']]}\n\n" if with_answer else ""
  return f"Question: {q['question']}\nAnswer:" + answer


def build_prompt(q: dict, shots: Sequence[dict], block) -> str:
  """Header, the answered examples, then the question itself (``block``: letter or cloze)."""
  return header(q["subject"]) + "".join(block(e, True) for e in shots) + block(q, False)


def choose_shots(
  questions: Sequence[dict], dev: Sequence[dict] | None, shots: int, seed: int
) -> list[list[dict]]:
  """Few-shot examples per question: the first ``shots`` of ``dev`` (as MMLU does), else
  ``shots`` other questions of the same set drawn with ``seed``."""
  if shots <= 0:
    return [[] for _ in questions]
  pool = dev or questions
  if any(q["answer"] is None for q in pool):
    raise ValueError(f"{shots} shots need answered examples: give --dev with answers")
  if dev:
    if len(dev) < shots:
      raise ValueError(f"{shots} shots asked but the dev set has {len(dev)} questions")
    return [list(dev[:shots]) for _ in questions]
  if len(questions) <= shots:
    raise ValueError(f"{shots} shots need more than {len(questions)} questions (or give --dev)")
  rng = np.random.default_rng(seed)
  out = []
  for i in range(len(questions)):
    pool = np.delete(np.arange(len(questions)), i)
    out.append([questions[j] for j in rng.choice(pool, shots, replace=False)])
  return out


def _fit(context: list[int], target: list[int], max_len: int) -> list[int]:
  """Drop the oldest context tokens (keeping BOS) so that context + target fits a row."""
  room = max_len + 1 - len(target)
  if room < 2:
    raise ValueError(f"an option of {len(target)} tokens does not fit max_len {max_len}")
  return context if len(context) <= room else context[:1] + context[len(context) - room + 1 :]


# --- scoring -------------------------------------------------------------------------------------


def accuracy(scores: np.ndarray, answers: np.ndarray) -> np.ndarray:
  """Credit per question: 1/k when the answer is among the k options sharing the top score."""
  scores = np.asarray(scores, np.float64)
  top = scores == scores.max(axis=1, keepdims=True)
  hit = top[np.arange(len(answers)), answers]
  return np.where(hit, 1.0 / top.sum(axis=1), 0.0)


def letter_ids(tokenizer: Tokenizer, n: int) -> list[int]:
  """The token of " A", " B", ... as it follows "Answer:" (SentencePiece's "▁A", BPE's "ĠA"):
  the one token that "Answer: A" adds to "Answer:"."""
  base = tokenizer.encode("Answer:", bos=False)
  ids = []
  for c in LETTERS[:n]:
    enc = tokenizer.encode(f"Answer: {c}", bos=False)
    if len(enc) != len(base) + 1 or enc[: len(base)] != base:
      raise ValueError(f"answer letter ' {c}' is not one token after 'Answer:' in {tokenizer.path}")
    ids.append(enc[-1])
  return ids


def score_questions(
  scorer: Scorer,
  tokenizer: Tokenizer,
  questions: Sequence[dict],
  shots: Sequence[Sequence[dict]],
  methods: Sequence[str],
) -> dict[str, np.ndarray]:
  """Per method, a [questions, options] score array (and ``letter_prob``: renormalised p)."""
  n_opt = {len(q["options"]) for q in questions}
  if len(n_opt) != 1:
    raise common.EvalDataError(f"questions have different numbers of options: {sorted(n_opt)}")
  n_opt = n_opt.pop()
  out: dict[str, np.ndarray] = {}
  if "loglik" in methods or "loglik_norm" in methods:
    unique: dict[tuple, int] = {}
    slots = np.zeros((len(questions), n_opt), np.int64)
    requests = []
    for i, (q, ex) in enumerate(zip(questions, shots)):
      ctx = tokenizer.encode(build_prompt(q, ex, cloze_block), bos=True)
      for k, option in enumerate(q["options"]):
        tgt = tokenizer.encode(option, bos=False)
        if not tgt:
          raise common.EvalDataError(f"question {q['id']}: option {LETTERS[k]} is empty")
        key = (tuple(_fit(ctx, tgt, scorer.max_len)), tuple(tgt))
        if key not in unique:  # identical options are one request: an exact tie
          unique[key] = len(requests)
          requests.append(Request(list(key[0]), list(key[1])))
        slots[i, k] = unique[key]
    lps, _ = scorer.logprobs(requests, desc="mcq options")
    sums = np.array([lp.sum() for lp in lps])
    means = np.array([lp.mean() for lp in lps])
    out["loglik"], out["loglik_norm"] = sums[slots], means[slots]
  if "letter" in methods:
    cands = letter_ids(tokenizer, n_opt)
    requests = []
    for q, ex in zip(questions, shots):
      ctx = tokenizer.encode(build_prompt(q, ex, letter_block), bos=True)
      tgt = [cands[q["answer"] or 0]]  # any letter: all of them come back as candidates
      requests.append(Request(_fit(ctx, tgt, scorer.max_len), tgt))
    _, cand_lps = scorer.logprobs(requests, candidates=cands, desc="mcq letters")
    letter = np.stack([c[0] for c in cand_lps])  # [questions, options]: log p(letter)
    out["letter"] = letter
    z = letter - letter.max(axis=1, keepdims=True)
    out["letter_prob"] = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  return out


def run(
  setup: common.TaskSetup,
  data: Sequence[str],
  *,
  method: str = "all",
  shots: int = 0,
  dev: str | None = None,
  subject: str | None = None,
  seed: int = 0,
  checker=None,
) -> dict:
  """The ``mcq`` task over one or more question files; files that withhold their answers get
  predictions (``mcq_predictions.jsonl``) and no score."""
  tokenizer, limit = setup.tokenizer, setup.limit
  methods = METHODS[method]
  scorer = setup.scorer()
  dev_qs = read_questions(dev) if dev else None
  rows, items, predictions, metrics = [], [], [], {}
  credits_all: dict[str, list[np.ndarray]] = {m: [] for m in methods}
  dropped, p_answer, unscored = 0, [], []
  for spec in data:
    name = common.corpus_name(spec)
    questions = read_questions(spec, limit)
    withheld = bool(questions) and questions[0]["answer"] is None
    if withheld and "letter" not in methods:
      raise ValueError(
        f"{spec} withholds its answers: its predictions need --method=letter (or all)"
      )
    if subject is not None:
      for q in questions:
        q["subject"] = subject
    flags = [None] * len(questions)
    if checker is not None:
      from astrollama_jax.eval.contamination import item_text

      report = checker.check([item_text(q) for q in questions])
      flags = list(zip(report.shares.tolist(), report.flagged.tolist()))
      if checker.drop:
        dropped += int(report.flagged.sum())
        keep = ~report.flagged
        questions = [q for q, k in zip(questions, keep) if k]
        flags = [f for f, k in zip(flags, keep) if k]
    if not questions:
      raise common.EvalDataError(f"{spec}: no questions to score")
    scores = score_questions(
      scorer, tokenizer, questions, choose_shots(questions, dev_qs, shots, seed), methods
    )
    if "letter" in methods:
      predictions += prediction_records(questions, scores["letter"])
    if withheld:
      unscored.append(name)
      logging.warning("%s: answers withheld, no score; predictions in mcq_predictions.jsonl", spec)
      rows.append({"data": name, "method": "letter (no answers)", "questions": len(questions)})
      credit = {}
    else:
      answers = np.array([q["answer"] for q in questions])
      credit = {m: accuracy(scores[m], answers) for m in methods}
      for m in methods:
        credits_all[m].append(credit[m])
        rows.append(_row(name, m, credit[m]))
        metrics[f"acc/{m}/{name}"] = rows[-1]["acc"]
    for i, q in enumerate(questions):
      rec = {
        "data": name,
        "id": q["id"],
        "subject": q["subject"],
        "question": q["question"],
        "options": q["options"],
        "answer": None if withheld else LETTERS[q["answer"]],
      }
      for m in methods:
        s = scores[m][i]
        rec[m] = {"scores": s.tolist(), "pred": LETTERS[int(np.argmax(s))]}
        if not withheld:
          rec[m]["credit"] = float(credit[m][i])
      if "letter" in methods and not withheld:
        rec["letter"]["prob_answer"] = float(scores["letter_prob"][i, q["answer"]])
        p_answer.append(rec["letter"]["prob_answer"])
      if flags[i] is not None:
        rec["contamination"], rec["flagged"] = flags[i]
      items.append(rec)
  scored = [m for m in methods if credits_all[m]]
  if len(data) - len(unscored) > 1:
    for m in scored:
      rows.append(_row("total", m, np.concatenate(credits_all[m])))
  for m in scored:
    total = np.concatenate(credits_all[m])
    lo, hi = stats.wilson_interval(total.sum(), len(total))
    metrics.update({f"acc/{m}": float(total.mean()), f"acc/{m}/lo": lo, f"acc/{m}/hi": hi})
  if p_answer:
    metrics["p_answer/letter"] = float(np.mean(p_answer))
  extra = {"shots": shots, "methods": list(methods), "data": list(data), "questions": len(items)}
  if unscored:
    extra["unscored"] = unscored  # answers withheld: predictions only
  files = {}
  if predictions:
    files["predictions"] = os.path.join(setup.output_dir, "mcq_predictions.jsonl")
    common.write_jsonl(files["predictions"], predictions)
  extra.update(common.contamination_note(checker, dropped))
  return setup.finish("mcq", metrics, rows, items, extra, COLUMNS, files=files)


def prediction_records(questions: Sequence[dict], letter_lp: np.ndarray) -> list[dict]:
  """Per question: its id, the letter with the highest next-token log-probability (the first
  such letter on a tie) and every letter's log-probability."""
  return [
    {
      "id": q["id"],
      "prediction": LETTERS[int(np.argmax(lp))],
      "logprobs": {LETTERS[k]: float(v) for k, v in enumerate(lp)},
    }
    for q, lp in zip(questions, letter_lp)
  ]


def _row(name: str, method: str, credit: np.ndarray) -> dict:
  lo, hi = stats.wilson_interval(credit.sum(), len(credit))
  return {
    "data": name,
    "method": method,
    "questions": len(credit),
    "correct": float(credit.sum()),
    "acc": float(credit.mean()),
    "acc_lo": lo,
    "acc_hi": hi,
  }
