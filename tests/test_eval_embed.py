"""AstroLLaMA embeddings against transformers' last hidden states, and nearest-paper search."""

from helpers import write_jsonl
from helpers_models import make_hf_folder, run_cli
from hf_reference import TINY_GQA
import numpy as np
import pytest
import torch

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import embed


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, shared_data):
  import json

  root = tmp_path_factory.mktemp("embed")
  model = make_hf_folder(TINY_GQA, root / "hf", seed=7)
  records = []
  with open(shared_data / "arxiv-astro-ph" / "abstracts.jsonl") as f:
    for line in f:
      records.append(json.loads(line))
      if len(records) == 12:
        break
  write_jsonl(root / "papers.jsonl", records)
  return root, model, records


def _torch_embedding(model, ids):
  """The mean of transformers' last hidden state over the tokens after BOS."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
  return out.hidden_states[-1][0, 1:].double().mean(0).numpy()


def test_embeddings_equal_torch_and_query_finds_the_paper(setup, capsys, tokenizer_path, tmp_path):
  root, model, records = setup
  summary = run_cli(
    capsys,
    "--task=embed",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={tmp_path}",
    f"--data={root / 'papers.jsonl'}",
    "--compute_dtype=float32",
    "--batch_size=2",
    "--neighbours=3",
    "--max_len=384",
  )
  ids, titles, emb = embed.load(str(tmp_path / "embeddings.npz"))
  assert ids == [r["id"] for r in records] and titles == [r["title"] for r in records]
  tok = Tokenizer(tokenizer_path)
  tokens = [tok.encode(r["abstract"]) for r in records]
  assert max(len(t) for t in tokens) > 384, "one text should be cut to the context"
  ref = np.stack([_torch_embedding(model, t[:384]) for t in tokens])
  np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)
  m = summary["metrics"]
  assert m["embed/count"] == 12 and 0.0 <= m["embed/knn_category_agreement"] <= 1.0

  # A query with one paper's abstract finds that paper first (cosine 1), from the saved file.
  q = records[4]["abstract"]
  summary = run_cli(
    capsys,
    "--task=embed",
    f"--checkpoint={root / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={tmp_path / 'q'}",
    f"--embeddings={tmp_path / 'embeddings.npz'}",
    f"--query={q}",
    "--compute_dtype=float32",
    "--neighbours=3",
    "--max_len=384",
  )
  rows = summary["rows"]
  assert [r["rank"] for r in rows] == [1, 2, 3]
  assert rows[0]["id"] == records[4]["id"] and rows[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
  assert rows[1]["cosine"] <= rows[0]["cosine"]
  sims = embed.normalise(ref) @ embed.normalise(ref[4])
  assert [r["id"] for r in rows] == [records[i]["id"] for i in np.argsort(-sims)[:3]]


def test_knn_category_agreement_on_known_clusters():
  rng = np.random.default_rng(0)
  centres = np.eye(4)[:2] * 10
  emb = np.concatenate(
    [centres[0] + rng.normal(size=(5, 4)) * 0.1, centres[1] + rng.normal(size=(5, 4)) * 0.1]
  )
  cats = ["GA"] * 5 + ["EP"] * 5
  agree, chance = embed.knn_category_agreement(emb, cats, k=3)
  assert agree == 1.0
  assert chance == pytest.approx(2 * 5 * 4 / (10 * 9))
  shuffled = ["GA", "EP"] * 5
  agree, _ = embed.knn_category_agreement(emb, shuffled, k=4)
  assert agree < 1.0
