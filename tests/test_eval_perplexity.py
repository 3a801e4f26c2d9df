"""The perplexity command against a plain PyTorch computation on the same random tiny HF Llama."""

import json

from helpers import write_jsonl
from helpers_models import make_hf_folder, run_cli, torch_token_logprobs
from hf_reference import TINY_GQA
import numpy as np
import pytest

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval.common import EvalDataError


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, abstracts):
  root = tmp_path_factory.mktemp("ppl")
  model = make_hf_folder(TINY_GQA, root / "hf", seed=3)
  # Two corpora: one with "abstract" fields, one with "text" + sections.
  write_jsonl(
    root / "abstracts.jsonl", [{"id": f"a{i}", "abstract": a} for i, a in enumerate(abstracts[:5])]
  )
  sections = ["abstract", "introduction", "conclusion", "introduction"]
  write_jsonl(
    root / "papers.jsonl",
    [{"id": f"p{i}", "section": s, "text": abstracts[10 + i]} for i, s in enumerate(sections)],
  )
  return root, model, Tokenizer(tokenizer_path)


def _torch_windowed_nll(model, ids, max_len, stride):
  """Sliding windows the textbook way: window inputs ids[b:b+L], count only new predictions."""
  total, count, prev_end, begin = 0.0, 0, 1, 0
  while True:
    inputs = ids[begin : begin + max_len + 1]
    lp = torch_token_logprobs(model, inputs)  # predicts ids[begin+1 .. begin+len-1]
    pred_idx = np.arange(begin + 1, begin + len(inputs))
    keep = pred_idx >= prev_end
    total -= lp[keep].sum()
    count += int(keep.sum())
    prev_end = begin + len(inputs)
    if prev_end >= len(ids):
      return total, count
    begin += stride


def _reference(model, tok, texts, max_len=10**9, stride=1):
  out = [_torch_windowed_nll(model, tok.encode(t), max_len, stride) for t in texts]
  return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def _items(path):
  return [json.loads(line) for line in open(path)]


def test_perplexity_equals_torch_per_corpus_section_and_total(
  setup, capsys, tokenizer_path, abstracts
):
  root, model, tok = setup
  out = root / "out"
  summary = run_cli(
    capsys,
    "--task=perplexity",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={out}",
    f"--data={root / 'abstracts.jsonl'},{root / 'papers.jsonl'}",
    "--compute_dtype=float32",
    "--batch_size=4",
    "--bootstrap=200",
  )
  ref_a = _reference(model, tok, abstracts[:5])
  ref_p = _reference(model, tok, abstracts[10:14])
  items = _items(out / "perplexity_items.jsonl")
  got = np.array([it["nll_sum"] for it in items])
  np.testing.assert_allclose(got, np.concatenate([ref_a[0], ref_p[0]]), rtol=1e-4)
  assert [it["tokens"] for it in items] == list(ref_a[1]) + list(ref_p[1])

  def ppl(nll, cnt):
    return float(np.exp(nll.sum() / cnt.sum()))

  m = summary["metrics"]
  assert m["ppl/abstracts"] == pytest.approx(ppl(*ref_a), rel=1e-4)
  assert m["ppl/papers"] == pytest.approx(ppl(*ref_p), rel=1e-4)
  both = (np.concatenate([ref_a[0], ref_p[0]]), np.concatenate([ref_a[1], ref_p[1]]))
  assert m["ppl"] == pytest.approx(ppl(*both), rel=1e-4)
  intro = [1, 3]
  assert m["ppl/papers/introduction"] == pytest.approx(
    ppl(ref_p[0][intro], ref_p[1][intro]), rel=1e-4
  )
  rows = {(r["corpus"], r["section"]): r for r in summary["rows"]}
  assert set(rows) == {
    ("abstracts", "all"),
    ("papers", "all"),
    ("papers", "abstract"),
    ("papers", "conclusion"),
    ("papers", "introduction"),
    ("total", "all"),
  }
  total = rows[("total", "all")]
  assert total["ppl_lo"] < total["ppl"] < total["ppl_hi"]
  assert total["docs"] == 9 and total["tokens"] == int(both[1].sum())
  assert json.load(open(out / "perplexity.json"))["metrics"] == m


def test_sliding_window_equals_torch(setup, tokenizer_path, abstracts):
  """Documents several windows long; also sharded over a (data=2, fsdp=2, tensor=2) mesh."""
  from astrollama_jax.eval import common, perplexity

  root, model, tok = setup
  texts = abstracts[20:23]
  ids = tok.encode_batch(texts)
  assert min(len(i) for i in ids) > 3 * 48, "the documents must span several windows"
  m = common.load(str(root / "hf"), "2,2,2", compute_dtype="float32", tokenizer=tokenizer_path)
  from astrollama_jax.eval.scoring import Scorer

  scorer = Scorer(m.cfg, m.params, m.mesh, batch_size=3, max_len=48, progress=False)
  nll, cnt = perplexity.document_nll(scorer, ids, stride=20)
  ref_nll, ref_cnt = _reference(model, tok, texts, max_len=48, stride=20)
  np.testing.assert_array_equal(cnt, ref_cnt)
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-4)


def test_bad_data_file_is_named(setup, capsys, tokenizer_path, tmp_path):
  from astrollama_jax.eval.common import EvalDataError

  root, _, _ = setup
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
  with pytest.raises(EvalDataError, match="bad.jsonl:2"):
    run_cli(
      capsys,
      "--task=perplexity",
      f"--checkpoint={root / 'hf'}",
      f"--tokenizer={tokenizer_path}",
      f"--output={tmp_path}",
      f"--data={bad}",
    )


def test_prepared_dataset_sections_and_contamination_drop(setup, capsys, tokenizer_path, tmp_path):
  """The validation split of a prepared ArrayRecord dataset, with planted contamination dropped."""
  import pathlib

  from astrollama_jax.data.corpus import read as corpus
  from astrollama_jax.data.corpus.build import build
  from astrollama_jax.data.corpus.config import CorpusConfig

  root, model, tok = setup
  demo = pathlib.Path(__file__).resolve().parents[1] / "data" / "demo_corpus"
  build(
    CorpusConfig(sources=[str(demo)], validation_fraction=0.5, progress=False),
    tmp_path / "ds",
  )
  source = corpus.read_split(tmp_path / "ds", "validation")
  recs = [
    {k: v.decode() if isinstance(v, bytes) else v for k, v in source[i].items()}
    for i in range(len(source))
  ]
  sections = {r["section"] for r in recs}
  assert {"abstract", "introduction"} <= sections
  planted = [r for r in recs if r["section"] == "abstract"][:2]
  write_jsonl(
    tmp_path / "train.jsonl", [{"text": "Some other words. " + r["text"]} for r in planted]
  )
  summary = run_cli(
    capsys,
    "--task=perplexity",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={tmp_path / 'out'}",
    f"--data={tmp_path / 'ds'}",
    "--compute_dtype=float32",
    "--batch_size=4",
    "--max_len=256",
    "--stride=128",
    f"--train_data={tmp_path / 'train.jsonl'}",
    "--drop_contaminated",
    "--bootstrap=50",
  )
  assert summary["contamination"]["dropped"] == 2
  planted_ids = {p["id"] for p in planted}
  kept = [r for r in recs if r["id"] not in planted_ids or r["section"] != "abstract"]
  items = _items(tmp_path / "out" / "perplexity_items.jsonl")
  assert [(it["id"], it["section"]) for it in items] == [(r["id"], r["section"]) for r in kept]
  nll, cnt = _reference(model, tok, [r["text"] for r in kept], max_len=256, stride=128)
  np.testing.assert_allclose([it["nll_sum"] for it in items], nll, rtol=1e-4)
  by_section = {r["section"]: r for r in summary["rows"] if r["section"] != "all"}
  assert set(by_section) == sections
  for section, row in by_section.items():
    idx = [i for i, r in enumerate(kept) if r["section"] == section]
    assert row["ppl"] == pytest.approx(np.exp(nll[idx].sum() / cnt[idx].sum()), rel=1e-4)
  assert max(cnt) > 256, "some section must span several windows"


def test_orbax_checkpoint_scores_like_the_hf_folder(
  setup, capsys, tokenizer_path, abstracts, tmp_path
):
  """A converted Orbax DIR (its own tokenizer) gives the HF folder's numbers; bf16 is close."""
  from astrollama_jax.checkpoints import writer
  from astrollama_jax.formats import hf

  root, model, tok = setup
  cfg, params = hf.load_hf(str(root / "hf"))
  ckpt = writer.save_params(str(tmp_path / "converted"), cfg, params, tokenizer_path)
  args = [
    "--task=perplexity",
    f"--data={root / 'abstracts.jsonl'}",
    "--batch_size=4",
    "--bootstrap=20",
  ]
  ours = run_cli(
    capsys, *args, f"--checkpoint={ckpt}", f"--output={tmp_path / 'o'}", "--compute_dtype=float32"
  )
  nll, cnt = _reference(model, tok, abstracts[:5])
  assert ours["metrics"]["ppl"] == pytest.approx(np.exp(nll.sum() / cnt.sum()), rel=1e-4)
  bf16 = run_cli(
    capsys,
    *args,
    f"--checkpoint={ckpt}",
    f"--output={tmp_path / 'b'}",
    "--compute_dtype=bfloat16",
    "--dtype=bfloat16",
  )
  assert bf16["metrics"]["nll"] == pytest.approx(ours["metrics"]["nll"], rel=2e-3)


def test_perplexity_by_month_on_dated_abstracts(setup, capsys, tokenizer_path, shared_data):
  """Real abstracts from three months: each month's row is the token-weighted perplexity of
  that month's documents, computed directly from the torch NLLs. A second file has no dates:
  its arXiv ids name the month."""
  from astrollama_jax.eval import perplexity

  root, model, tok = setup
  picked = {}
  with open(shared_data / "arxiv-astro-ph" / "abstracts.jsonl") as f:
    for line in f:
      rec = json.loads(line)
      month = rec["date"][:7]
      if month in ("2025-04", "2025-09", "2026-03") and len(picked.setdefault(month, [])) < 2:
        picked[month].append(rec)
  recs = [r for m in sorted(picked) for r in picked[m]]
  assert len(recs) == 6
  # Listed in April 2025 under an April 2025 id: the id gives the same month as the date.
  undated = [{"id": r["id"], "abstract": r["abstract"]} for r in picked["2025-04"]]
  assert all(r["id"].startswith("2504.") for r in undated)
  write_jsonl(root / "dated.jsonl", recs)
  write_jsonl(root / "undated.jsonl", undated)
  out = root / "by_month"
  summary = run_cli(
    capsys,
    "--task=perplexity",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={out}",
    f"--data={root / 'dated.jsonl'},{root / 'undated.jsonl'}",
    "--by=month",
    "--compute_dtype=float32",
    "--batch_size=4",
    "--bootstrap=50",
  )
  nll, cnt = _reference(model, tok, [r["abstract"] for r in recs])
  months = np.array([r["date"][:7] for r in recs])
  m = summary["metrics"]
  rows = {(r["corpus"], r["month"]): r for r in summary["rows"]}
  for month in ("2025-04", "2025-09", "2026-03"):
    idx = months == month
    want = float(np.exp(nll[idx].sum() / cnt[idx].sum()))
    assert m[f"ppl/dated/month/{month}"] == pytest.approx(want, rel=1e-4)
    assert rows[("dated", month)]["docs"] == 2
    assert rows[("dated", month)]["tokens"] == int(cnt[idx].sum())
  # Over both files, April holds the dated pair and the same two abstracts again.
  april = months == "2025-04"
  want = float(np.exp(2 * nll[april].sum() / (2 * cnt[april].sum())))
  assert m["ppl/month/2025-04"] == pytest.approx(want, rel=1e-4)
  assert rows[("total", "2025-04")]["docs"] == 4
  assert m["ppl/undated/month/2025-04"] == pytest.approx(want, rel=1e-4)
  items = _items(out / "perplexity_items.jsonl")
  assert [it["month"] for it in items] == list(months) + ["2025-04"] * 2

  with pytest.raises(EvalDataError, match=r"x.jsonl: document 'p1' has no usable date"):
    perplexity.document_month({"id": "p1", "text": "t"}, "x.jsonl")
  assert perplexity.document_month({"id": "astro-ph/9605151"}, "x") == "1996-05"
