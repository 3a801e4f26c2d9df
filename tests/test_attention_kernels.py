"""Fused attention kernels (Pallas, interpret mode on CPU) against the dense XLA path.

Packed grouped-query batches with head_dim 128: several documents per row, left and right
padding, a length that is not a multiple of the kernels' 128-row tile. Outputs at real tokens
and gradients must equal the XLA path's; then the same at model level (a train-step gradient and
the perplexity command against transformers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrollama_jax import sharding
from astrollama_jax.model import attention as attn
from astrollama_jax.model import llama
from astrollama_jax.model.config import ATTENTION_IMPLS, LlamaConfig
from astrollama_jax.train.loss import lm_loss_sums

FUSED = ("splash", "flash_gpu")
# head_dim 128 (as LLaMA-2), grouped queries (2 per KV head), real vocabulary.
TINY_128 = LlamaConfig(
  dim=256,
  n_layers=2,
  n_heads=2,
  n_kv_heads=1,
  ffn_dim=256,
  max_seq_len=512,
  compute_dtype="float32",
)


def _segments(b, t, seed):
  """Packed rows: left padding, 1-3 documents, right padding (segment 0 = padding)."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, t), np.int32)
  for row in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t), 4, replace=False))
    seg[row, cuts[0] : cuts[1]] = 1
    seg[row, cuts[1] : cuts[2]] = 2
    seg[row, cuts[2] : cuts[3]] = 3
  seg[0, :] = np.where(np.arange(t) < t - 5, np.maximum(seg[0], 1), 0)  # one row nearly full
  return seg


def _qkv(b, t, h, k, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
  kk = jax.random.normal(keys[1], (b, t, k, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, k, d), jnp.float32).astype(dtype)
  return q, kk, v


def _value_and_grads(impl, q, k, v, seg):
  """Attention output and d(weighted sum over real tokens)/d(q, k, v)."""
  idx = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), seg.shape)
  weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))
  real = (seg != 0)[..., None, None]

  def f(q, k, v):
    out = attn.attention(q, k, v, idx, idx, seg, seg, impl)
    return jnp.sum(jnp.where(real, out.astype(jnp.float32) * weights, 0.0)), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def _assert_close(got, want, tol):
  scale = max(float(np.abs(want).max()), 1.0)
  np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("t", [200, 256])
def test_kernel_equals_xla_float32(impl, t):
  q, k, v = _qkv(2, t, 4, 2, 128, jnp.float32)
  seg = jnp.asarray(_segments(2, t, seed=t))
  out, grads = _value_and_grads(impl, q, k, v, seg)
  ref, ref_grads = _value_and_grads("xla", q, k, v, seg)
  real = np.asarray(seg) != 0
  _assert_close(out[real], ref[real], 1e-5)
  for got, want in zip(grads, ref_grads):
    _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_kernel_close_to_xla_bfloat16(impl):
  q, k, v = _qkv(2, 256, 4, 2, 128, jnp.bfloat16, seed=1)
  seg = jnp.asarray(_segments(2, 256, seed=5))
  out, grads = _value_and_grads(impl, q, k, v, seg)
  ref, ref_grads = _value_and_grads("xla", q, k, v, seg)
  real = np.asarray(seg) != 0
  _assert_close(out[real], ref[real], 2e-2)
  for got, want in zip(grads, ref_grads):
    _assert_close(got, want, 3e-2)


def test_segments_are_isolated():
  """Changing one document's keys and values changes no other document's outputs."""
  q, k, v = _qkv(1, 256, 2, 1, 128, jnp.float32, seed=2)
  seg = np.ones((1, 256), np.int32)
  seg[0, 100:] = 2
  seg = jnp.asarray(seg)
  idx = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (1, 256))
  out = attn.attention(q, k, v, idx, idx, seg, seg, "splash")
  k2, v2 = k.at[:, 100:].add(1.0), v.at[:, 100:].mul(-1.0)
  out2 = attn.attention(q, k2, v2, idx, idx, seg, seg, "splash")
  np.testing.assert_array_equal(np.asarray(out[:, :100]), np.asarray(out2[:, :100]))
  assert not np.allclose(np.asarray(out[:, 100:]), np.asarray(out2[:, 100:]))


def test_sharded_kernel_equals_xla_on_a_mesh():
  """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs per shard (shard_map) and agrees."""
  mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
  q, k, v = _qkv(4, 256, 4, 2, 128, jnp.float32, seed=3)
  seg = jnp.asarray(_segments(4, 256, seed=9))
  with jax.set_mesh(mesh):
    out, grads = _value_and_grads("splash", q, k, v, seg)
    idx = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), seg.shape)
    text = (
      jax.jit(lambda *a: attn.attention(*a, idx, idx, seg, seg, "splash")).lower(q, k, v).as_text()
    )
  assert "shard_map" in text or "sdy.manual_computation" in text
  ref, ref_grads = _value_and_grads("xla", q, k, v, seg)
  real = np.asarray(seg) != 0
  _assert_close(out[real], ref[real], 1e-5)
  for got, want in zip(grads, ref_grads):
    _assert_close(got, want, 1e-5)


def test_auto_and_decode_choices(monkeypatch):
  assert {"splash", "flash_gpu", "auto"} <= set(ATTENTION_IMPLS)
  assert attn.resolve_impl("auto", "tpu") == "splash"
  assert attn.resolve_impl("auto", "gpu") == "cudnn"
  assert attn.resolve_impl("auto", "cpu") == "xla"
  assert attn.resolve_impl("auto") == "xla"  # tests run on CPU
  assert attn.resolve_impl("splash", "cpu") == "splash"
  # With a KV cache (one query against 300 slots) the fused impls take the dense path.
  q, _, _ = _qkv(2, 1, 4, 2, 128, jnp.float32, seed=4)
  _, k, v = _qkv(2, 300, 4, 2, 128, jnp.float32, seed=5)
  k_seg = jnp.asarray(np.where(np.arange(300) < 40, 0, 1)[None].repeat(2, 0), jnp.int32)
  k_idx = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (2, 300))
  q_idx, q_seg = jnp.full((2, 1), 250, jnp.int32), jnp.ones((2, 1), jnp.int32)
  want = attn.dot_attention(q, k, v, attn.attention_mask(q_idx, k_idx, q_seg, k_seg), "xla")
  for impl in FUSED + ("auto",):
    got = attn.attention(q, k, v, q_idx, k_idx, q_seg, k_seg, impl, cached=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Also where "auto" would pick cuDNN for training (which cannot run here): decode takes xla.
  monkeypatch.setattr(attn, "target_platform", lambda: "gpu")
  assert attn.resolve_impl("auto") == "cudnn"
  got = attn.attention(q, k, v, q_idx, k_idx, q_seg, k_seg, "auto", cached=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="self-attention"):
    attn.attention(q, k, v, q_idx, k_idx, q_seg, k_seg, "splash")


def _packed_batch(b, t, seed):
  seg = _segments(b, t, seed)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 32000, (b, t)).astype(np.int32)
  positions = np.zeros((b, t), np.int32)
  for row in range(b):  # positions restart at every document
    for s in np.unique(seg[row]):
      where = np.nonzero(seg[row] == s)[0]
      positions[row, where] = np.arange(len(where))
  targets = np.roll(tokens, -1, axis=1)
  loss_mask = ((seg != 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
  return {
    k: jnp.asarray(x)
    for k, x in dict(
      tokens=tokens, targets=targets, segment_ids=seg, positions=positions, loss_mask=loss_mask
    ).items()
  }


@pytest.mark.parametrize("impl", FUSED)
def test_train_step_gradients_equal_xla(impl):
  """The LM loss and its gradient through the whole model (full remat) equal the XLA path's."""
  cfg = TINY_128.replace(remat_policy="full")
  params = llama.init_params(cfg, 7)
  batch = _packed_batch(2, 160, seed=11)

  def grads(c):
    def loss(p):
      total, count = lm_loss_sums(c, p, batch)
      return total / count

    return jax.jit(jax.value_and_grad(loss))(params)

  loss_x, g_x = grads(cfg)
  loss_k, g_k = grads(cfg.replace(attention_impl=impl))
  np.testing.assert_allclose(float(loss_k), float(loss_x), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
    _assert_close(np.asarray(got), np.asarray(want), 1e-5)


def test_perplexity_with_splash_equals_torch(tmp_path, capsys, tokenizer_path, abstracts):
  """As tests/test_eval_perplexity.py: per-item NLL sums equal a plain PyTorch forward pass."""
  import json

  from helpers import write_jsonl
  from helpers_models import make_hf_folder, run_cli, torch_token_logprobs

  from astrollama_jax.data.tokenizer import Tokenizer

  model = make_hf_folder(TINY_128, tmp_path / "hf", seed=3)
  write_jsonl(
    tmp_path / "abstracts.jsonl",
    [{"id": f"a{i}", "abstract": a} for i, a in enumerate(abstracts[:3])],
  )
  run_cli(
    capsys,
    "--task=perplexity",
    f"--checkpoint={tmp_path / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    f"--output={tmp_path / 'out'}",
    f"--data={tmp_path / 'abstracts.jsonl'}",
    "--compute_dtype=float32",
    "--batch_size=2",
    "--bootstrap=0",
    "--attention=splash",
  )
  tok = Tokenizer(tokenizer_path)
  want = [-torch_token_logprobs(model, tok.encode(a)).sum() for a in abstracts[:3]]
  items = [json.loads(line) for line in open(tmp_path / "out" / "perplexity_items.jsonl")]
  np.testing.assert_allclose([it["nll_sum"] for it in items], want, rtol=1e-4)
