"""The LLaMA 3 architecture (llama3 RoPE scaling, tied embeddings, theta 500,000) against
transformers' LlamaForCausalLM on the same random weights, float32.

The tiny models use an ``original_max_position_embeddings`` of 64 with head_dim 16, so a
96-token sequence crosses it and the three frequency bands of the scaling (kept, divided,
interpolated) all occur; one test crosses the real 8,192 boundary."""

from hf_reference import hf_logits, make_hf_model
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from astrollama_jax.formats import hf, mapping
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig, get_config
from astrollama_jax.model.layers import rope_inv_freq

SCALED = LlamaConfig(
  vocab_size=256,
  dim=64,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  ffn_dim=128,
  rope_theta=500000.0,
  max_seq_len=512,
  rope_scaling="llama3",
  rope_factor=8.0,
  rope_low_freq_factor=1.0,
  rope_high_freq_factor=4.0,
  rope_original_max_seq_len=64,
  compute_dtype="float32",
)
SEQ = 96
QK_GAIN = 20.0


def _ids(cfg: LlamaConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
  """Mean next-token negative log-likelihood (log perplexity), in float64."""
  lg = logits[:, :-1].astype(np.float64)
  lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
  picked = np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0]
  return float(np.mean(lse - picked))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
  """(config, our params read from the HF folder, the torch model)."""
  cfg = SCALED.replace(tie_embeddings=request.param)
  folder = tmp_path_factory.mktemp("hf")
  model = make_hf_model(cfg, seed=3)
  model.save_pretrained(str(folder))
  loaded_cfg, params = hf.load_hf(str(folder))
  assert loaded_cfg.replace(compute_dtype="float32") == cfg
  return cfg, params, model


def test_inverse_frequencies_equal_transformers(pair):
  cfg, _, model = pair
  ours = np.asarray(rope_inv_freq(cfg))
  np.testing.assert_array_equal(ours, model.model.rotary_emb.inv_freq.numpy())
  plain = np.asarray(rope_inv_freq(cfg.replace(rope_scaling="default")))
  assert ours[0] == plain[0] and ours[-1] == plain[-1] / cfg.rope_factor
  assert plain[1] / cfg.rope_factor < ours[1] < plain[1], "the middle band is interpolated"


def test_logits_and_perplexity_equal_transformers_across_the_original_context(pair):
  cfg, params, model = pair
  assert ("lm_head" in params) != cfg.tie_embeddings
  ids = _ids(cfg, 2, SEQ)
  ours = np.asarray(llama.apply(cfg, params, jnp.asarray(ids))[0])
  ref = hf_logits(model, ids)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert abs(_nll(ours, ids) - _nll(ref, ids)) < 1e-5
  # The scaling matters past the original context: plain RoPE gives other logits there.
  plain = np.asarray(llama.apply(cfg.replace(rope_scaling="default"), params, jnp.asarray(ids))[0])
  assert np.abs(plain[:, 64:] - ref[:, 64:]).max() > 1e-3


def test_kv_cache_decode_equals_full_forward(pair):
  cfg, params, _ = pair
  ids = jnp.asarray(_ids(cfg, 2, 80, seed=1))
  full, _ = llama.apply(cfg, params, ids)
  step = jax.jit(lambda p, t, pos, c: llama.apply(cfg, p, t, pos, cache=c))
  cache = llama.init_cache(cfg, 2, 80)
  pos = jnp.broadcast_to(jnp.arange(80, dtype=jnp.int32), ids.shape)
  outs, (prefill, cache) = [], step(params, ids[:, :60], pos[:, :60], cache)
  outs.append(prefill)
  for t in range(60, 80):  # decoding crosses position 64
    logits, cache = step(params, ids[:, t : t + 1], pos[:, t : t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-5, rtol=0)


def test_tied_hf_round_trip(tmp_path):
  from safetensors.numpy import load_file
  import transformers

  cfg = SCALED.replace(tie_embeddings=True)
  params = jax.tree.map(np.asarray, llama.init_params(cfg, seed=5))
  assert "lm_head" not in params
  summary = hf.save_hf(cfg, params, str(tmp_path / "out"))
  tensors = {}
  for f in sorted((tmp_path / "out").glob("*.safetensors")):
    tensors.update(load_file(str(f)))
  assert "lm_head.weight" not in tensors and summary["parameters"] == cfg.num_params()
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  ids = _ids(cfg, 1, SEQ, seed=2)
  ours = np.asarray(llama.apply(cfg, params, jnp.asarray(ids))[0])
  np.testing.assert_allclose(ours, hf_logits(model, ids), atol=1e-4, rtol=0)
  back_cfg, back = hf.load_hf(str(tmp_path / "out"))
  assert back_cfg == cfg.replace(compute_dtype=back_cfg.compute_dtype)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_logits_equal_transformers_beyond_position_8192():
  """The real 3.1 scaling (8,192 original positions) on a one-layer model, 8,200 tokens."""
  cfg = get_config("llama3_1_8b").replace(
    vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, compute_dtype="float32"
  )
  model = make_hf_model(cfg, seed=4)
  with torch.no_grad():  # sharp attention, so that the logits depend on the rotations
    for name, w in model.named_parameters():
      if name.endswith(("q_proj.weight", "k_proj.weight")):
        w.mul_(QK_GAIN)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

  def read(entry, shape):
    del shape
    for name in entry.hf_names(cfg.n_layers):
      yield sd[name]

  params = {}
  for path, arr in mapping.stack_params(cfg, read):
    mapping.set_path(params, path, arr)
  ids = _ids(cfg, 1, 8200, seed=6)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  ours = np.asarray(jax.jit(lambda p, t: llama.apply(cfg, p, t)[0])(params, jnp.asarray(ids)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The scaling matters: plain RoPE gives other logits past 8,192 (by ~0.07 here).
  plain = cfg.replace(rope_scaling="default")
  unscaled = np.asarray(jax.jit(lambda p, t: llama.apply(plain, p, t)[0])(params, jnp.asarray(ids)))
  assert np.abs(unscaled[:, 8192:] - ref[:, 8192:]).max() > 1e-3


def test_presets_have_meta_shapes():
  sizes = {
    "llama3_8b": 8.03e9,
    "llama3_1_8b": 8.03e9,
    "llama3_1_70b": 70.55e9,
    "llama3_1_405b": 405.85e9,
    "llama3_2_1b": 1.236e9,
    "llama3_2_3b": 3.213e9,
    "llama3_3_70b": 70.55e9,
  }
  for name, n in sizes.items():
    cfg = get_config(name)
    assert cfg.vocab_size == 128256 and cfg.rope_theta == 500000.0 and cfg.n_kv_heads == 8
    assert abs(cfg.num_params() - n) / n < 0.002, (name, cfg.num_params())
    assert cfg.max_seq_len == (8192 if name == "llama3_8b" else 131072)
    assert cfg.tie_embeddings == name.startswith("llama3_2")
    hf_cfg = cfg.to_hf_config()
    assert LlamaConfig.from_hf_config(hf_cfg, param_dtype="float32") == cfg
  assert get_config("llama3_2_1b").rope_factor == 32.0
  assert get_config("llama3_1_70b").hf_rope_scaling() == {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  }
  tied = get_config("llama3_2_1b")
  shapes = llama.param_shapes(tied)
  assert "lm_head" not in shapes
  assert sum(x.size for x in jax.tree.leaves(shapes)) == tied.num_params()
  assert "lm_head" in llama.param_shapes(get_config("llama2_7b"))


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3_scaling_is_read_from_either_key(key):
  hf_cfg = SCALED.to_hf_config()
  scaling = {**hf_cfg.pop("rope_scaling"), "rope_theta": hf_cfg.pop("rope_theta")}
  cfg = LlamaConfig.from_hf_config({**hf_cfg, key: scaling}, compute_dtype="float32")
  assert cfg == SCALED


@pytest.mark.parametrize(
  "change,message",
  [
    ({"rope_type": "yarn"}, r"^RoPE scaling 'yarn' \(config.json rope_scaling\) is not supported"),
    ({"rope_type": "longrope"}, r"^RoPE scaling 'longrope'"),
    ({"low_freq_factor": None}, r"^RoPE scaling 'llama3' \(config.json rope_scaling\) lacks "),
    ({"high_freq_factor": 1.0}, r"^llama3 RoPE scaling needs rope_high_freq_factor 1.0 > "),
    ({"factor": -2.0}, r"^llama3 RoPE scaling needs positive numbers: rope_factor=-2.0"),
  ],
)
def test_other_or_broken_scalings_are_refused_in_one_line(change, message):
  hf_cfg = SCALED.to_hf_config()
  hf_cfg["rope_scaling"] = {**hf_cfg["rope_scaling"], **change}
  with pytest.raises(ValueError, match=message) as err:
    LlamaConfig.from_hf_config(hf_cfg)
  assert "\n" not in str(err.value)


def test_training_loss_scoring_and_generation_use_the_tied_head(pair):
  """Every path that applies the head itself (loss, scoring, generation) against transformers."""
  from astrollama_jax.eval.scoring import Scorer, window_requests
  from astrollama_jax.generation import generate
  from astrollama_jax.train import loss as loss_lib

  cfg, params, model = pair
  if not cfg.tie_embeddings:
    pytest.skip("the untied head is LLaMA-2's, covered by test_train_step and test_generate")
  ids = _ids(cfg, 1, 80, seed=7)
  with torch.no_grad():
    ref_logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.double()
  ref_lp = torch.log_softmax(ref_logits, -1)[0, :-1].gather(
    -1, torch.as_tensor(ids[0, 1:])[:, None]
  )
  ref_lp = ref_lp[:, 0].numpy()

  batch = {
    "tokens": ids[:, :-1],
    "targets": ids[:, 1:],
    "positions": np.arange(79)[None],
    "segment_ids": np.ones((1, 79), np.int32),
    "loss_mask": np.ones((1, 79), np.float32),
  }
  total, count = loss_lib.lm_loss_sums(cfg, params, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(float(total / count), -ref_lp.mean(), rtol=1e-5)

  scorer = Scorer(cfg, params, batch_size=1, max_len=80, progress=False)
  (scored,), _ = scorer.logprobs(window_requests(ids[0].tolist(), 80, 80))
  np.testing.assert_allclose(scored[-79:], ref_lp, atol=1e-4, rtol=0)

  prompt = ids[0, :60].tolist()  # the 10 new tokens cross the original context (64)
  ours = generate(cfg, params, [prompt], 10, eos_id=-1).tokens[0]
  with torch.no_grad():
    theirs = model.generate(
      torch.as_tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=0
    )[0, 60:].tolist()
  assert ours == theirs


def test_tied_scaled_model_sharded_equals_single_device():
  from astrollama_jax import sharding

  cfg = SCALED.replace(tie_embeddings=True)
  params = llama.init_params(cfg, 8)
  ids = jnp.asarray(_ids(cfg, 2, SEQ, seed=8))
  ref, _ = llama.apply(cfg, params, ids)
  mesh = sharding.make_mesh((1, 2, 4))
  sharded = llama.shard_params(cfg, params, mesh)
  assert sharded["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, t: llama.apply(cfg, p, t)[0])(
      sharded, jax.device_put(ids, sharding.batch_sharding(mesh))
    )
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
