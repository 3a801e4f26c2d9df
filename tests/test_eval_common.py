"""The parts every eval task shares: packing, windows, intervals, reading records."""

from __future__ import annotations

import numpy as np
import pytest

from astrollama_jax.eval import common, scoring, stats


@pytest.mark.parametrize(
  "n,max_len,stride",
  [(2, 8, 4), (9, 8, 4), (10, 8, 4), (37, 8, 3), (37, 8, 8), (37, 8, 1), (100, 16, 16)],
)
def test_windows_score_every_token_once_with_enough_context(n, max_len, stride):
  ids = list(range(100, 100 + n))
  reqs = scoring.window_requests(ids, max_len, stride)
  scored = [t for r in reqs for t in r.target]
  assert scored == ids[1:]
  for k, r in enumerate(reqs):
    assert len(r.context) + len(r.target) - 1 <= max_len  # fits one row of inputs
    # context and target are a contiguous slice of the document
    start = ids.index(r.context[0])
    assert list(r.context) + list(r.target) == ids[start : start + len(r.context) + len(r.target)]
    if k > 0:
      assert len(r.context) >= max_len - stride + 1 and len(r.target) <= stride


def test_window_stride_is_checked():
  with pytest.raises(ValueError, match="stride"):
    scoring.window_requests(list(range(10)), 4, 5)


def test_pack_places_everything_once_within_rows():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 50, 300).tolist()
  rows = scoring.pack(lengths, 64, max_segments=5)
  placed = sorted(i for row in rows for i in row)
  assert placed == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 64 and len(row) <= 5 for row in rows)
  assert len(rows) <= 1.25 * sum(lengths) / 64 + 1  # packs tightly
  with pytest.raises(ValueError, match="sequence 1 has 70 tokens"):
    scoring.pack([3, 70], 64, 4)


def test_wilson_and_bootstrap_intervals():
  lo, hi = stats.wilson_interval(0, 10)
  assert lo == 0.0 and 0.25 < hi < 0.35  # Wilson's upper bound for 0/10 is 0.2775
  lo, hi = stats.wilson_interval(50, 100)
  assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
  lo, hi = stats.normal_interval(50, 100)
  assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=1e-3)
  nll = np.array([10.0, 20.0, 30.0, 40.0])
  tok = np.array([10, 10, 10, 10])
  lo, hi = stats.perplexity_ci(nll, tok, n_boot=500)
  assert np.exp(1.0) <= lo < np.exp(2.5) < hi <= np.exp(4.0)
  assert stats.perplexity_ci(nll, tok, n_boot=500) == (lo, hi)  # seeded


def test_read_texts_names_the_bad_line(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "fine"}\n{"title": "no text"}\n')
  with pytest.raises(common.EvalDataError, match=r"bad.jsonl:2: no text field"):
    common.read_texts(str(p))
  p.write_text('{"abstract": "fine"}\nnot json\n')
  with pytest.raises(common.EvalDataError, match=r"bad.jsonl:2: not JSON"):
    common.read_texts(str(p))
  p.write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n')
  with pytest.raises(common.EvalDataError, match=r"bad.jsonl:2: text that cannot be encoded"):
    common.read_texts(str(p))
  p.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
  with pytest.raises(common.EvalDataError, match=r"bad.jsonl:2: not UTF-8"):
    common.read_texts(str(p))
  p.write_text('{"abstract": "an abstract", "id": "x1"}\n')
  assert common.read_texts(str(p))[0]["id"] == "x1"


def test_scoring_rows_follow_the_requests_not_a_long_context():
  """A 131,072-position model scores abstracts in rows of 2,048 tokens, not of its context."""
  from astrollama_jax.eval.scoring import MIN_ROW, Scorer
  from astrollama_jax.model.config import get_config

  cfg = get_config("llama3_1_8b").replace(
    vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128
  )
  assert cfg.max_seq_len == 131072
  scorer = Scorer(cfg, None)
  assert [scorer.row_length(n) for n in (1, 300, MIN_ROW, MIN_ROW + 1, 70000, 131072)] == [
    MIN_ROW,
    MIN_ROW,
    MIN_ROW,
    2 * MIN_ROW,
    131072,
    131072,
  ]
  assert Scorer(cfg.replace(max_seq_len=512), None).row_length(300) == 512
