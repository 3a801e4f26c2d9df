"""The 13-gram contamination check finds planted overlaps and nothing in clean text."""

import json

from helpers import write_jsonl
from helpers_models import run_cli
import numpy as np
import pytest

from astrollama_jax.eval import contamination


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, abstracts):
  """A training corpus of abstracts 0..39 with two planted passages; eval items from 40..63."""
  root = tmp_path_factory.mktemp("contam")
  train = [{"id": f"t{i}", "abstract": a} for i, a in enumerate(abstracts[:40])]
  # Plant: item e0 verbatim (re-cased, different punctuation/whitespace) inside a longer record,
  # and the first half of item e1's words in a chat-style record (no text field).
  e0, e1 = abstracts[40], abstracts[41]
  train.append(
    {
      "id": "planted0",
      "text": "Preamble words here. " + e0.upper().replace(",", " ;") + " And a trailing sentence.",
    }
  )
  half = " ".join(e1.split()[: len(e1.split()) // 2])
  train.append(
    {"conversations": [{"from": "human", "value": "Summarise."}, {"from": "gpt", "value": half}]}
  )
  write_jsonl(root / "train.jsonl", train)
  items = [{"id": f"e{i}", "text": a} for i, a in enumerate(abstracts[40:64])]
  write_jsonl(root / "eval.jsonl", items)
  return root, items


def test_planted_overlaps_are_found_and_clean_items_are_not(corpus):
  root, items = corpus
  checker = contamination.Checker([str(root / "train.jsonl")], n=13, threshold=0.3, progress=False)
  report = checker.check([it["text"] for it in items])
  assert report.shares[0] == 1.0
  text1 = items[1]["text"]
  n1 = len(contamination.words(text1))
  half = len(contamination.words(" ".join(text1.split()[: len(text1.split()) // 2])))
  expected = (half - 13 + 1) / (n1 - 13 + 1)  # the 13-grams inside the planted first half
  assert report.shares[1] == pytest.approx(expected, abs=1e-12)
  assert np.all(report.shares[2:] == 0.0), "clean abstracts share no 13-gram with the corpus"
  assert report.flagged.tolist() == [True, True] + [False] * (len(items) - 2)
  strict = contamination.Checker([str(root / "train.jsonl")], threshold=0.9, progress=False)
  assert strict.check([it["text"] for it in items]).flagged.sum() == 1


def test_short_items_and_ngram_edges():
  assert len(contamination.ngram_hashes("one two three", 13)) == 0
  text = " ".join(f"w{i}" for i in range(20))
  assert len(contamination.ngram_hashes(text, 13)) == 8
  checker = contamination.Checker([], n=3, progress=False)
  found = checker.scan(["x w1 w2 w3 y"], set(contamination.ngram_hashes(text, 3).tolist()))
  assert found == {hash(("w1", "w2", "w3"))}
  with pytest.raises(ValueError, match="threshold"):
    contamination.Checker([], threshold=1.5)


def test_contamination_command_and_scoring_without_flagged(corpus, capsys, tmp_path):
  root, items = corpus
  summary = run_cli(
    capsys,
    "--task=contamination",
    f"--data={root / 'eval.jsonl'}",
    f"--train_data={root / 'train.jsonl'}",
    "--threshold=0.3",
    f"--output={tmp_path}",
  )
  assert summary["metrics"]["contamination/flagged"] == 2
  lines = [json.loads(line) for line in open(tmp_path / "contamination_items.jsonl")]
  assert [r["id"] for r in lines if r["flagged"]] == ["e0", "e1"]


def test_prepared_dataset_as_training_corpus(tmp_path, abstracts):
  """The train split of an ArrayRecord dataset: its own sections are found, other text is not."""
  import pathlib

  from astrollama_jax.data.corpus import read as corpus
  from astrollama_jax.data.corpus.build import build
  from astrollama_jax.data.corpus.config import CorpusConfig

  demo = pathlib.Path(__file__).resolve().parents[1] / "data" / "demo_corpus"
  build(
    CorpusConfig(sources=[str(demo)], validation_fraction=0.3, progress=False),
    tmp_path / "ds",
  )
  train = corpus.read_split(tmp_path / "ds", "train")
  copied = [train[i]["text"].decode() for i in range(3)]
  checker = contamination.Checker([str(tmp_path / "ds")], threshold=0.5, progress=False)
  report = checker.check(copied + abstracts[:3])
  assert report.shares.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
  assert report.flagged.tolist() == [True] * 3 + [False] * 3
