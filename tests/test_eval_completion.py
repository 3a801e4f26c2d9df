"""The completion task end to end on real abstracts, its scores checked against torch."""

import json

from helpers import write_jsonl
from helpers_models import make_hf_folder, run_cli, torch_logprobs_given
from hf_reference import TINY
import numpy as np
import pytest
import torch

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import completion


def test_sentence_boundaries_skip_abbreviations_and_decimals():
  text = (
    "We observe M31 with HST. The rate is 3.5 per cent, as in Smith et al. 2020 and "
    "Fig. 2 shows. Dust (e.g. PAHs) matters! Is J. Doe right? Yes."
  )
  cuts = completion.sentence_boundaries(text)
  starts = [text[c : c + 6] for c in cuts]
  assert starts == ["The ra", "Dust (", "Is J. ", "Yes."]
  prefix, rest = completion.split_text(text, 0.5)
  assert prefix.endswith("Fig. 2 shows.") and rest.startswith("Dust (e.g. PAHs)")
  assert completion.split_text("One sentence only, no break", 0.5) is None


def _torch_embedding(model, ids):
  with torch.no_grad():
    h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
  return h[0, 1:].double().mean(0).numpy()


def test_completion_end_to_end_on_real_abstracts(tmp_path, capsys, tokenizer_path, shared_data):
  records = []
  with open(shared_data / "arxiv-astro-ph" / "abstracts.jsonl") as f:
    for line in f:
      records.append(json.loads(line))
      if len(records) == 5:
        break
  write_jsonl(tmp_path / "abstracts.jsonl", records)
  model = make_hf_folder(TINY, tmp_path / "hf", seed=11)
  out = tmp_path / "out"
  summary = run_cli(
    capsys,
    "--task=completion",
    f"--checkpoint={tmp_path / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={out}",
    f"--data={tmp_path / 'abstracts.jsonl'}",
    "--max_new_tokens=24",
    "--compute_dtype=float32",
    "--gen_batch_size=3",
    "--batch_size=2",
    "--bootstrap=100",
  )
  samples = [json.loads(line) for line in open(out / "completion_samples.jsonl")]
  assert [s["id"] for s in samples] == [r["id"] for r in records]
  tok = Tokenizer(tokenizer_path)
  for s, r in zip(samples, records):
    text = r["abstract"]
    assert text.startswith(s["prefix"]) and s["prefix"][-1] in ".!?"
    assert 0.3 * len(text) < len(s["prefix"]) < 0.7 * len(text)
    rest = text[len(s["prefix"]) :].strip()
    ref_ids = tok.encode(rest, bos=False)[:24]
    assert s["tokens"] == 24 and s["reference"] == tok.decode(ref_ids)
    assert s["generated_tokens"] == 24 or (s["finish"] == "eos" and s["generated_tokens"] < 24)
    # (b) the real continuation's NLL given the prompt, as torch computes it
    prompt = tok.encode(s["prefix"])
    ref_nll = -torch_logprobs_given(model, prompt, ref_ids).sum()
    assert s["continuation_nll"] == pytest.approx(ref_nll, rel=1e-4)
    # (a) cosine of the model's own embeddings of generation and reference
    gen_ids = tok.encode(s["generated"])
    if len(gen_ids) > 1:
      a, b = _torch_embedding(model, gen_ids), _torch_embedding(model, tok.encode(s["reference"]))
      cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
      assert s["cosine"] == pytest.approx(cos, abs=1e-4)
    else:
      assert s["cosine"] == 0.0
  m = summary["metrics"]
  assert m["completion/cosine"] == pytest.approx(np.mean([s["cosine"] for s in samples]))
  nll = sum(s["continuation_nll"] for s in samples)
  assert m["completion/ppl"] == pytest.approx(np.exp(nll / (24 * len(samples))), rel=1e-6)
  assert m["completion/ppl_lo"] <= m["completion/ppl"] <= m["completion/ppl_hi"]
