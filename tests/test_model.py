"""The Flax LLaMA-2 against transformers' PyTorch LlamaForCausalLM on the same weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrollama_jax import sharding
from astrollama_jax.formats import hf
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.model import llama
from hf_reference import TINY, TINY_GQA, hf_logits, save_hf_model


@pytest.fixture(scope="module", params=[TINY, TINY_GQA], ids=["mha", "gqa"])
def pair(request, tmp_path_factory):
  """(config, our params, HF torch model, HF folder)."""
  folder = tmp_path_factory.mktemp("hf")
  model = save_hf_model(request.param, folder, seed=1)
  cfg, params = hf.load_hf(str(folder))
  return cfg.replace(compute_dtype="float32"), params, model, folder


def _batch(tokenizer_path, texts, max_len=96):
  tok = Tokenizer(tokenizer_path)
  # Rows of different lengths, so a batch of several rows is padded on the right.
  ids = [tok.encode(t)[: max_len - 9 * r] for r, t in enumerate(texts)]
  n = max(len(i) for i in ids)
  arr = np.zeros((len(ids), n), np.int32)
  mask = np.zeros((len(ids), n), np.int32)
  for r, i in enumerate(ids):
    arr[r, : len(i)] = i
    mask[r, : len(i)] = 1
  return arr, mask


def test_config_from_hf_folder(pair):
  cfg, _, model, _ = pair
  assert cfg.n_kv_heads == model.config.num_key_value_heads
  assert cfg.vocab_size == 32000


def test_logits_match_hf_on_real_abstracts(pair, tokenizer_path, abstracts):
  cfg, params, model, _ = pair
  ids, _ = _batch(tokenizer_path, abstracts[:1])
  ours, _ = llama.apply(cfg, params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_padded_batch_matches_hf(pair, tokenizer_path, abstracts):
  cfg, params, model, _ = pair
  ids, mask = _batch(tokenizer_path, abstracts[:4], max_len=80)
  assert (mask == 0).any(), "the batch must contain padding"
  ours, _ = llama.apply(cfg, params, jnp.asarray(ids), segment_ids=jnp.asarray(mask))
  ref = hf_logits(model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=1e-4, rtol=0)


def test_packed_segments_do_not_attend_across_documents(pair, tokenizer_path, abstracts):
  cfg, params, model, _ = pair
  tok = Tokenizer(tokenizer_path)
  a, b = tok.encode(abstracts[5])[:40], tok.encode(abstracts[6])[:30]
  row = np.array([a + b], np.int32)
  seg = np.array([[1] * len(a) + [2] * len(b)], np.int32)
  pos = np.array([list(range(len(a))) + list(range(len(b)))], np.int32)
  ours, _ = llama.apply(cfg, params, jnp.asarray(row), jnp.asarray(pos), jnp.asarray(seg))
  ours = np.asarray(ours)[0]
  np.testing.assert_allclose(ours[: len(a)], hf_logits(model, np.array([a]))[0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours[len(a) :], hf_logits(model, np.array([b]))[0], atol=1e-4, rtol=0)


def test_hf_round_trip_is_bit_exact(pair, tmp_path, tokenizer_path, abstracts):
  cfg, params, model, folder = pair
  out = tmp_path / "export"
  summary = hf.save_hf(cfg, params, str(out), max_shard_bytes=3 * 1024**2)
  assert summary["shards"] > 1, "the test wants a sharded export with an index"
  from safetensors.numpy import load_file

  original, exported = {}, {}
  for d, store in ((folder, original), (out, exported)):
    for f in sorted(d.glob("*.safetensors")):
      store.update(load_file(str(f)))
  assert original.keys() == exported.keys()
  for k in original:
    assert original[k].dtype == exported[k].dtype, k
    np.testing.assert_array_equal(original[k], exported[k], err_msg=k)
  import transformers

  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).float().eval()
  ids, _ = _batch(tokenizer_path, abstracts[2:3], max_len=48)
  np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))


def test_kv_cache_decode_equals_full_forward(pair, tokenizer_path, abstracts):
  cfg, params, _, _ = pair
  ids, _ = _batch(tokenizer_path, abstracts[3:5], max_len=24)
  ids = jnp.asarray(ids[:, :24])
  full, _ = llama.apply(cfg, params, ids)
  step = jax.jit(lambda p, t, pos, c: llama.apply(cfg, p, t, pos, cache=c))
  cache = llama.init_cache(cfg, ids.shape[0], 32)
  pos = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), ids.shape)
  prefill, cache = step(params, ids[:, :10], pos[:, :10], cache)
  outs = [prefill]
  for t in range(10, 24):
    lg, cache = step(params, ids[:, t : t + 1], pos[:, t : t + 1], cache)
    outs.append(lg)
  np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-5, rtol=0)
  assert int(cache["index"]) == 24


@pytest.mark.parametrize(
  "impl,remat",
  [("jax", "none"), ("xla", "full"), ("xla", "dots"), ("xla", "qkv_out"), ("xla", "minimal")],
)
def test_attention_impls_and_remat_policies_agree(impl, remat):
  cfg = TINY_GQA
  params = llama.init_params(cfg, 3)
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)

  def loss(p, c):
    logits, _ = llama.apply(c, p, ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (l0, lg0), g0 = jax.value_and_grad(loss, has_aux=True)(params, cfg)
  (l1, lg1), g1 = jax.value_and_grad(loss, has_aux=True)(
    params, cfg.replace(attention_impl=impl, remat_policy=remat)
  )
  np.testing.assert_allclose(lg1, lg0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_is_close(pair, tokenizer_path, abstracts):
  cfg, params, model, _ = pair
  ids, _ = _batch(tokenizer_path, abstracts[:1], max_len=48)
  ours, _ = llama.apply(cfg.replace(compute_dtype="bfloat16"), params, jnp.asarray(ids))
  ref = hf_logits(model, ids)
  err = np.abs(np.asarray(ours, np.float32) - ref).max()
  assert err < 0.05, err  # bf16 has 8 mantissa bits; logits are O(1)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_logits_equal_single_device(shape, tokenizer_path, abstracts):
  assert jax.device_count() == 8
  cfg = TINY_GQA
  params = llama.init_params(cfg, 5)
  ids, mask = _batch(tokenizer_path, abstracts[8:16], max_len=32)
  ref, _ = llama.apply(cfg, params, jnp.asarray(ids), segment_ids=jnp.asarray(mask))

  mesh = sharding.make_mesh(shape)
  sharded = llama.shard_params(cfg, params, mesh)
  # Parameters really are sharded as the rules say.
  q = sharded["layers"]["attn"]["q_proj"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  k = sharded["layers"]["attn"]["k_proj"]
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  emb = sharded["embed"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  n_fsdp, n_tp = mesh.shape["fsdp"], mesh.shape["tensor"]
  assert q.addressable_shards[0].data.shape == (
    cfg.n_layers,
    cfg.dim // n_fsdp,
    cfg.n_heads // n_tp,
    cfg.head_dim,
  )
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    fwd = jax.jit(lambda p, t, s: llama.apply(cfg, p, t, segment_ids=s)[0])
    out = fwd(sharded, jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_init_is_sharded_without_materialising():
  mesh = sharding.make_mesh((1, 4, 2))
  params = llama.init_params(TINY_GQA, 0, mesh=mesh)
  up = params["layers"]["mlp"]["up_proj"]
  assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (2, 16, 64)


def test_presets_match_meta_shapes():
  from astrollama_jax.model.config import get_config

  c70 = get_config("llama2_70b")
  assert (c70.n_heads, c70.n_kv_heads, c70.ffn_dim, c70.dim, c70.n_layers) == (
    64,
    8,
    28672,
    8192,
    80,
  )
  assert abs(get_config("llama2_7b").num_params() - 6.74e9) < 0.01e9
  assert abs(c70.num_params() - 68.98e9) < 0.1e9
  abstract = llama.param_shapes(get_config("llama2_7b"))
  assert sum(x.size for x in jax.tree.leaves(abstract)) == get_config("llama2_7b").num_params()


def test_bad_hf_input_names_tensor_and_shapes(pair, tmp_path):
  cfg, _, _, folder = pair
  from safetensors.numpy import load_file, save_file

  bad = tmp_path / "bad"
  bad.mkdir()
  tensors = {}
  for f in folder.glob("*.safetensors"):
    tensors.update(load_file(str(f)))
  (bad / "config.json").write_text((folder / "config.json").read_text())
  broken = dict(tensors)
  broken["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 5), np.float32)
  save_file(broken, str(bad / "model.safetensors"))
  with pytest.raises(
    hf.ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(3, 5\).*\(128, 64\)"
  ):
    hf.load_hf(str(bad))
  del broken["model.layers.1.mlp.up_proj.weight"]
  save_file(broken, str(bad / "model.safetensors"))
  with pytest.raises(hf.ConversionError, match=r"up_proj.*missing"):
    hf.load_hf(str(bad))
  with pytest.raises(hf.ConversionError, match="n_layers"):
    hf.load_hf(str(folder), cfg=cfg.replace(n_layers=3))
  (bad / "config.json").write_text(
    json.dumps({**json.loads((folder / "config.json").read_text()), "model_type": "mistral"})
  )
  with pytest.raises(ValueError, match="model_type"):
    hf.load_hf(str(bad))


def test_abstract_shapes_inside_a_mesh_context():
  from astrollama_jax.model.config import get_config

  cfg = get_config("tiny", n_layers=3)  # a config not seen before, so nothing is cached
  with jax.set_mesh(sharding.make_mesh((1, 4, 2))):
    shapes = llama.param_shapes(cfg)
  assert shapes["layers"]["attn"]["q_proj"].shape == (3, 64, 4, 16)
