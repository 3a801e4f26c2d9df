"""Generation against transformers' ``generate`` on one random tiny LLaMA; sampling rules."""

from hf_reference import TINY_GQA, save_hf_model
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from astrollama_jax import sharding
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.formats import hf
from astrollama_jax.generation import bucket, generate, sample_logits

N = 24  # new tokens; every test uses the same bucket so compiled programs are shared


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, abstracts):
  """(cfg, params, HF model, tokenizer, prompts of 4 different lengths, our greedy result)."""
  folder = tmp_path_factory.mktemp("hf")
  model = save_hf_model(TINY_GQA, folder, seed=1)
  cfg, params = hf.load_hf(str(folder))
  cfg = cfg.replace(compute_dtype="float32")
  tok = Tokenizer(tokenizer_path)
  prompts = [tok.encode(a)[:n] for a, n in zip(abstracts[10:14], (9, 40, 3, 23))]
  greedy = generate(cfg, params, prompts, N, tokenizer=tok)
  return cfg, params, model, tok, prompts, greedy


def hf_greedy(model, prompts, n, eos_id):
  """transformers greedy generation, left-padded, each row cut at its first EOS."""
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :] = p
    mask[i, width - len(p) :] = 1
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: threads only fight XLA's for the two cores
  try:
    with torch.no_grad():
      out = model.generate(
        torch.as_tensor(ids),
        attention_mask=torch.as_tensor(mask),
        do_sample=False,
        max_new_tokens=n,
        pad_token_id=0,
        eos_token_id=eos_id,
      )
  finally:
    torch.set_num_threads(threads)
  rows = out[:, width:].tolist()
  return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def cut_at(rows, eos_id):
  return [r[: r.index(eos_id)] if eos_id in r else r for r in rows]


def test_greedy_matches_transformers_token_for_token(setup):
  cfg, params, model, tok, prompts, greedy = setup
  assert len({len(p) for p in prompts}) == 4, "prompts must differ in length (left padding)"
  assert greedy.tokens == hf_greedy(model, prompts, N, eos_id=2)
  assert [len(t) for t in greedy.tokens] == [N] * 4 and greedy.finish_reasons == ["length"] * 4
  assert greedy.texts == [tok.decode(t) for t in greedy.tokens]


def test_eos_stops_a_row(setup):
  cfg, params, model, tok, prompts, greedy = setup
  eos = greedy.tokens[1][5]  # the token row 1 makes at step 5 becomes the end-of-sequence id
  res = generate(cfg, params, prompts, N, eos_id=eos)
  expected = cut_at(greedy.tokens, eos)
  assert res.tokens == expected
  assert len(res.tokens[1]) <= 5 and res.finish_reasons[1] == "eos"
  assert res.tokens == hf_greedy(model, prompts, N, eos_id=eos)


def test_any_of_several_end_ids_stops_a_row(setup):
  """A family with several end ids (LLaMA 3.1: end of text, eom, eot) stops at whichever comes."""
  cfg, params, model, tok, prompts, greedy = setup
  ends = [greedy.tokens[1][5], greedy.tokens[3][9], -7]
  res = generate(cfg, params, prompts, N, eos_id=ends)
  for row, got, reason in zip(greedy.tokens, res.tokens, res.finish_reasons):
    cut = next((k for k, t in enumerate(row) if t in ends), len(row))
    assert got == row[:cut] and reason == ("eos" if cut < len(row) else "length")
  assert len(res.tokens[1]) <= 5 and len(res.tokens[3]) <= 9
  with pytest.raises(ValueError, match="at most 8 end ids"):
    generate(cfg, params, prompts, N, eos_id=list(range(9)))


def test_top_k_1_and_tiny_top_p_equal_greedy(setup):
  cfg, params, _, _, prompts, greedy = setup
  assert generate(cfg, params, prompts, N, temperature=1.0, top_k=1, seed=3).tokens == greedy.tokens
  assert (
    generate(cfg, params, prompts, N, temperature=1.0, top_p=1e-6, seed=4).tokens == greedy.tokens
  )


def test_sampling_is_seeded_and_chunking_does_not_change_it(setup):
  cfg, params, _, _, prompts, greedy = setup
  kw = dict(temperature=1.0, top_k=50, top_p=0.95)
  a = generate(cfg, params, prompts, N, seed=7, **kw)
  streamed = []
  b = generate(cfg, params, prompts, N, seed=7, stream=streamed.append, chunk_size=5, **kw)
  c = generate(cfg, params, prompts, N, seed=8, **kw)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens and a.tokens != greedy.tokens
  assert len(streamed) == 1 + -(-(N - 1) // 5)  # the prefill's token at once, then chunks of 5
  assert [sum((chunk[i] for chunk in streamed), []) for i in range(len(prompts))] == b.tokens


def test_sample_logits_follows_the_filtered_distribution():
  probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None].repeat(2, axis=0)
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(
    jax.vmap(lambda key, t, k, p: sample_logits(logits, key, t, k, p), (0, None, None, None))
  )

  def freq(t=1.0, k=0, p=1.0):
    ids = np.asarray(draw(keys, np.float32(t), np.int32(k), np.float32(p))).ravel()
    return np.bincount(ids, minlength=5) / ids.size

  np.testing.assert_allclose(freq(), probs, atol=0.03)
  np.testing.assert_allclose(freq(k=2), [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.03)
  # Nucleus 0.75: the smallest set with mass >= 0.75 is the top three tokens.
  np.testing.assert_allclose(freq(p=0.75), np.r_[probs[:3] / 0.85, 0, 0], atol=0.03)
  sharp = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
  np.testing.assert_allclose(freq(t=0.5), sharp, atol=0.03)


def test_stop_strings_truncate(setup):
  cfg, params, _, tok, prompts, greedy = setup
  full = greedy.texts[0]
  start = len(tok.decode(greedy.tokens[0][:8]))
  # offset 0: the stop string starts at a token boundary; 2: inside token 8.
  for chunk, offset in ((1, 0), (6, 0), (3, 2)):
    stop = full[start + offset : start + offset + 5]
    assert len(stop.strip()) > 2, f"pick a visible stop string, not {stop!r}"
    res = generate(
      cfg,
      params,
      prompts,
      N,
      stop_strings=[stop, "never appears §§"],
      tokenizer=tok,
      chunk_size=chunk,
    )
    assert res.texts[0] == full[: full.find(stop)] and res.finish_reasons[0] == "stop"
    kept = tok.decode(res.tokens[0])  # the ids stop short of the stop string
    assert res.texts[0].startswith(kept)
    if full.find(stop) == start + offset:
      assert res.tokens[0] == greedy.tokens[0][:8] and (kept == res.texts[0]) == (offset == 0)
    for i in range(1, 4):
      if stop not in greedy.texts[i]:
        assert res.tokens[i] == greedy.tokens[i]


def test_sharded_generation_equals_single_device(setup):
  cfg, params, _, _, prompts, greedy = setup
  # Batch over 8 data shards (padded to 8 rows): greedy.
  assert (
    generate(cfg, params, prompts, N, mesh=sharding.make_mesh((8, 1, 1))).tokens == greedy.tokens
  )
  # fsdp x tensor: weights, KV heads and the vocabulary split; sampling sorts and draws across
  # vocab shards, and equal samples need equal logits, so this checks the model as well.
  kw = dict(temperature=1.0, top_k=50, top_p=0.95, seed=7)
  sampled = generate(cfg, params, prompts, N, mesh=sharding.make_mesh((1, 2, 4)), **kw)
  assert sampled.tokens == generate(cfg, params, prompts, N, **kw).tokens
  assert sampled.tokens != greedy.tokens


def test_bad_requests_are_refused_with_the_reason(setup):
  cfg, params, _, _, prompts, _ = setup
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(cfg, params, [prompts[0], []], 4)
  with pytest.raises(ValueError, match="max_seq_len 512"):
    generate(cfg, params, [prompts[0]], 510)
  with pytest.raises(ValueError, match="top_p"):
    generate(cfg, params, prompts, 4, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(cfg, params, [[1, 32000]], 4)
  with pytest.raises(ValueError, match="tokenizer"):
    generate(cfg, params, prompts, 4, stop_strings=["x"])


def test_buckets_keep_shapes_few():
  assert [bucket(n) for n in (1, 16, 17, 33, 64, 65, 200)] == [16, 16, 32, 64, 64, 128, 256]
  assert [bucket(n, 64) for n in (1, 64, 65, 3000)] == [64, 64, 128, 4096]
