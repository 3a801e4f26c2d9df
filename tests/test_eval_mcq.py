"""Multiple-choice scoring against a plain PyTorch computation, and accuracy including ties."""

import csv
import json

from helpers import write_jsonl
from helpers_models import make_hf_folder, run_cli, torch_logprobs_given
from hf_reference import TINY
import numpy as np
import pytest
import torch

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import mcq

QUESTIONS = [
  {
    "id": "q1",
    "question": "Which process powers main-sequence stars?",
    "A": "Hydrogen fusion in the core",
    "B": "Gravitational contraction",
    "C": "Chemical burning",
    "D": "Radioactive decay of iron",
    "answer": "A",
  },
  {
    "id": "q2",
    "question": "What is the approximate age of the Universe?",
    "A": "13.8 billion years",
    "B": "4.6 billion years",
    "C": "1 million years",
    "D": "100 billion years",
    "answer": 0,
  },
  # A tie at the top for the summed log-likelihood: two identical one-token options against
  # long ones (every extra token costs ~10 nats in a random model). Answer inside the tie.
  {
    "id": "tie_hit",
    "question": "What fills most of the volume between galaxies?",
    "A": "gas",
    "B": "gas",
    "C": "a dense population of primordial black holes and brown dwarfs",
    "D": "cold molecular clouds forming new generations of massive stars",
    "answer": "B",
  },
  # The same tie with the answer outside it: no credit for the summed log-likelihood.
  {
    "id": "tie_miss",
    "question": "Which object is the densest?",
    "A": "star",
    "B": "star",
    "C": "a neutron star with a mass of about 1.4 solar masses",
    "D": "a white dwarf supported by electron degeneracy pressure",
    "answer": "C",
  },
  {
    "id": "q5",
    "question": "Which band does ALMA observe in?",
    "A": "Millimetre and submillimetre",
    "B": "X-ray",
    "C": "Gamma-ray",
    "D": "Ultraviolet",
    "answer": "A",
  },
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
  root = tmp_path_factory.mktemp("mcq")
  model = make_hf_folder(TINY, root / "hf", seed=5)
  write_jsonl(root / "astro.jsonl", QUESTIONS)
  with open(root / "astronomy_test.csv", "w", newline="") as f:
    csv.writer(f).writerows(
      [
        ["What is a light year a unit of?", "Distance", "Time", "Brightness", "Mass", "A"],
        ["Which planet has the largest mass?", "Earth", "Jupiter", "Mars", "Venus", "B"],
        ["The Sun is of spectral type", "O", "B", "G", "M", "C"],
      ]
    )
  with open(root / "astronomy_dev.csv", "w", newline="") as f:
    csv.writer(f).writerows(
      [["Which is closest to the Sun?", "Mercury", "Venus", "Earth", "Mars", "A"]]
    )
  return root, model, Tokenizer(tokenizer_path)


def _torch_next_logprobs(model, ids, token_ids):
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
  return torch.log_softmax(logits, -1)[token_ids].numpy()


def _reference(model, tok, questions, shot):
  """(summed, mean, letter) scores per question, computed with torch one prompt at a time."""
  sums, means, letters = [], [], []
  letter_ids = [tok.encode(c, bos=False)[0] for c in "ABCD"]
  for q in questions:
    head = mcq.header(q["subject"])
    ctx = tok.encode(head + mcq.cloze_block(shot, True) + mcq.cloze_block(q, False))
    lps = [torch_logprobs_given(model, ctx, tok.encode(o, bos=False)) for o in q["options"]]
    sums.append([lp.sum() for lp in lps])
    means.append([lp.mean() for lp in lps])
    ctx = tok.encode(head + mcq.letter_block(shot, True) + mcq.letter_block(q, False))
    letters.append(_torch_next_logprobs(model, ctx, letter_ids))
  return np.array(sums), np.array(means), np.array(letters)


def _expected_credit(scores, answer):
  best = max(scores)
  top = [k for k, s in enumerate(scores) if s == best]
  return 1.0 / len(top) if answer in top else 0.0


def test_mcq_scores_equal_torch_and_accuracy_counts_ties(setup, capsys, tmp_path):
  root, model, tok = setup
  summary = run_cli(
    capsys,
    "--task=mcq",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tok.path}",
    f"--output={tmp_path}",
    f"--data={root / 'astro.jsonl'},{root / 'astronomy_test.csv'}",
    "--shots=1",
    f"--dev={root / 'astronomy_dev.csv'}",
    "--compute_dtype=float32",
    "--batch_size=2",
    "--max_len=256",
  )
  items = [json.loads(line) for line in open(tmp_path / "mcq_items.jsonl")]
  questions = mcq.read_questions(str(root / "astro.jsonl"))
  questions += mcq.read_questions(str(root / "astronomy_test.csv"))
  assert [q["subject"] for q in questions[-3:]] == ["astronomy"] * 3
  shot = mcq.read_questions(str(root / "astronomy_dev.csv"))[0]
  sums, means, letters = _reference(model, tok, questions, shot)
  got = {
    m: np.array([it[m]["scores"] for it in items]) for m in ("loglik", "loglik_norm", "letter")
  }
  np.testing.assert_allclose(got["loglik"], sums, rtol=1e-4)
  np.testing.assert_allclose(got["loglik_norm"], means, rtol=1e-4)
  np.testing.assert_allclose(got["letter"], letters, rtol=1e-4)
  p = np.exp(letters) / np.exp(letters).sum(1, keepdims=True)
  np.testing.assert_allclose(
    [it["letter"]["prob_answer"] for it in items],
    p[np.arange(len(items)), [q["answer"] for q in questions]],
    rtol=1e-4,
  )

  # The planted ties are exact and at the top; credit 1/2 inside, 0 outside.
  by_id = {it["id"]: it for it in items}
  for qid, credit in (("tie_hit", 0.5), ("tie_miss", 0.0)):
    s = by_id[qid]["loglik"]["scores"]
    assert s[0] == s[1] == max(s)
    assert by_id[qid]["loglik"]["credit"] == credit
  # Accuracy = mean credit, with ties computed from the torch scores by the rule above.
  answers = [q["answer"] for q in questions]
  for method, ref in (("loglik", sums), ("loglik_norm", means), ("letter", letters)):
    credit = [_expected_credit(list(r), a) for r, a in zip(ref, answers)]
    assert [it[method]["credit"] for it in items] == credit
    assert summary["metrics"][f"acc/{method}"] == pytest.approx(np.mean(credit))
    assert (
      summary["metrics"][f"acc/{method}/lo"]
      <= np.mean(credit)
      <= summary["metrics"][f"acc/{method}/hi"]
    )
  rows = {(r["data"], r["method"]) for r in summary["rows"]}
  assert ("total", "letter") in rows and ("astronomy_test", "loglik") in rows


def test_accuracy_with_ties():
  scores = np.array(
    [
      [1.0, 2.0, 2.0, 0.0],  # tie B/C, answer B -> 1/2
      [1.0, 2.0, 2.0, 0.0],  # tie B/C, answer A -> 0
      [3.0, 3.0, 3.0, 3.0],  # all tied -> 1/4
      [0.0, -1.0, 5.0, 4.9],
    ]
  )  # clear C, answer C -> 1
  credit = mcq.accuracy(scores, np.array([1, 0, 3, 2]))
  np.testing.assert_array_equal(credit, [0.5, 0.0, 0.25, 1.0])


def test_bad_question_files_are_named(tmp_path):
  p = tmp_path / "q.jsonl"
  write_jsonl(p, [{"question": "x?", "A": "1", "B": "2", "answer": "C"}])
  with pytest.raises(mcq.common.EvalDataError, match=r"q.jsonl:1: answer 'C' is not one of A, B"):
    mcq.read_questions(str(p))
  write_jsonl(p, [{"question": "x?", "A": "1", "C": "2", "answer": "A"}])
  with pytest.raises(mcq.common.EvalDataError, match="options must be fields A, B"):
    mcq.read_questions(str(p))
  c = tmp_path / "short.csv"
  c.write_text("question,A,B,C,D,answer\nq?,a,b\n")
  with pytest.raises(mcq.common.EvalDataError, match=r"short.csv:2: expected question"):
    mcq.read_questions(str(c))


# AstroMLab-1's public layout: question_id, the question, options A-D, the answer withheld.
# The questions are written for this test; ANSWERS holds what the answered copy gives.
WITHHELD = [
  {
    "question_id": "w1",
    "question": "A galaxy's rotation curve stays flat far beyond its visible disc. What does "
    "this usually suggest?",
    "A": "A halo of unseen mass",
    "B": "A failing telescope",
    "C": "A very bright nucleus",
    "D": "A young stellar population",
  },
  {
    "question_id": "w2",
    "question": "Which quantity does a parallax measurement give most directly?",
    "A": "Temperature",
    "B": "Distance",
    "C": "Metallicity",
    "D": "Rotation period",
  },
  {
    "question_id": "w3",
    "question": "Lines in a spectrum shifted to longer wavelengths mean the source is",
    "A": "approaching",
    "B": "rotating slowly",
    "C": "receding",
    "D": "cooling",
  },
]
ANSWERS = {"w1": "A", "w2": "B", "w3": "C"}


def test_withheld_answers_give_predictions_and_answered_ones_a_score(setup, capsys, tmp_path):
  """The predictions file has every id, one letter and four log-probabilities each; where the
  answers exist, the letter accuracy is the one computed directly from those log-probs."""
  root, _, tok = setup
  public = tmp_path / "astromlab_public.json"
  public.write_text(json.dumps(WITHHELD))
  answered = tmp_path / "answered.jsonl"
  write_jsonl(answered, [{**q, "answer": ANSWERS[q["question_id"]]} for q in WITHHELD])
  summary = run_cli(
    capsys,
    "--task=mcq",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tok.path}",
    f"--output={tmp_path / 'out'}",
    f"--data={public},{answered}",
    "--method=letter",
    "--compute_dtype=float32",
    "--max_len=128",
  )
  preds = [json.loads(line) for line in open(tmp_path / "out" / "mcq_predictions.jsonl")]
  assert [p["id"] for p in preds] == ["w1", "w2", "w3"] * 2
  for p in preds:
    assert list(p["logprobs"]) == ["A", "B", "C", "D"]
    lp = np.array(list(p["logprobs"].values()))
    assert np.all(lp < 0) and p["prediction"] == "ABCD"[int(np.argmax(lp))]
  # The prompt holds no answer, so withholding it changes nothing in what is scored.
  np.testing.assert_allclose(
    [list(p["logprobs"].values()) for p in preds[:3]],
    [list(p["logprobs"].values()) for p in preds[3:]],
    rtol=1e-6,
  )
  assert summary["unscored"] == ["astromlab_public"]
  assert "acc/letter/astromlab_public" not in summary["metrics"]
  credit = mcq.accuracy(
    np.array([list(p["logprobs"].values()) for p in preds[3:]]),
    np.array(["ABCD".index(ANSWERS[p["id"]]) for p in preds[3:]]),
  )
  assert summary["metrics"]["acc/letter"] == pytest.approx(credit.mean())
  assert summary["metrics"]["acc/letter/answered"] == pytest.approx(credit.mean())
  items = [json.loads(line) for line in open(tmp_path / "out" / "mcq_items.jsonl")]
  assert [it["answer"] for it in items[:3]] == [None] * 3
  assert "credit" not in items[0]["letter"]


def test_withheld_answers_need_the_letter_method_and_no_mixing(setup, capsys, tmp_path):
  root, _, tok = setup
  public = tmp_path / "public.jsonl"
  write_jsonl(public, WITHHELD)
  with pytest.raises(ValueError, match="withholds its answers: .* --method=letter"):
    run_cli(
      capsys,
      "--task=mcq",
      f"--checkpoint={root / 'hf'}",
      f"--tokenizer={tok.path}",
      f"--output={tmp_path / 'out'}",
      f"--data={public}",
      "--method=loglik",
    )
  mixed = tmp_path / "mixed.jsonl"
  write_jsonl(mixed, [WITHHELD[0], {**WITHHELD[1], "answer": "B"}])
  with pytest.raises(mcq.common.EvalDataError, match=r"mixed.jsonl:2: an 'answer' field"):
    mcq.read_questions(str(mixed))
  assert [q["id"] for q in mcq.read_questions(str(public))] == ["w1", "w2", "w3"]


def test_letter_tokens_follow_answer_colon(shared_data):
  """ " A" after "Answer:" is one token in both tokenizer families, with its leading space."""
  for path in ("llama2/tokenizer.model", "llama3/tokenizer.json"):
    tok = Tokenizer(str(shared_data / "tokenizer" / path))
    ids = mcq.letter_ids(tok, 4)
    for c, i in zip("ABCD", ids):
      assert tok.encode(f"Question?\nAnswer: {c}", bos=False)[-1] == i
      assert tok.decode([i]).strip() == c
    assert len(set(ids)) == 4
