"""The train step: loss against transformers, sharding, gradient accumulation, chunked loss, skips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrollama_jax import sharding
from astrollama_jax.model import llama
from astrollama_jax.model.config import get_config
from astrollama_jax.train import (
  data,
  loss as loss_lib,
  optimizer,
  state as state_lib,
  step as step_lib,
)
from astrollama_jax.train.defaults import base_config

CFG = get_config("tiny_gqa", compute_dtype="float32")
SEQ = 32


def _hparams(**kw):
  """A config whose optimizer and schedule sections take ``kw`` (each key where it belongs)."""
  c = base_config()
  # A large epsilon keeps Adam's first updates continuous in the gradient (lr * g / (|g| + eps)
  # instead of lr * sign(g)), so float noise in near-zero gradients cannot flip whole updates.
  kw = {"learning_rate": 1e-2, "warmup_ratio": 0.0, "adam_eps": 1e-3, **kw}
  for k, v in kw.items():
    (c.schedule if k in c.schedule else c.optimizer)[k] = v
  return c


def _batch(rows, seed=0, start=0):
  raw = [data.synthetic_row(seed, start + r, SEQ) for r in range(rows)]
  return {k: np.stack([r[k] for r in raw]) for k in raw[0]}


def _run(mesh_shape, batches, grad_accum=1, loss_chunk=0, devices=None, **hp):
  """Train on ``batches`` from a fixed init; return (params on host after each step, metrics)."""
  mesh = sharding.make_mesh(mesh_shape, devices)
  tx, schedule = optimizer.make_optimizer(_hparams(**hp), total_steps=10)
  _, shardings = state_lib.abstract_state(CFG, tx, mesh)
  with jax.set_mesh(mesh):
    st = state_lib.create_state(llama.init_params(CFG, seed=3, mesh=mesh), tx, shardings, seed=0)
    train_step = step_lib.make_train_step(
      CFG, tx, schedule, shardings, mesh, grad_accum=grad_accum, loss_chunk=loss_chunk
    )
    params, metrics = [], []
    for b in batches:
      st, m = train_step(st, data.to_global(mesh, b))
      params.append(jax.device_get(st.params))
      metrics.append(jax.device_get(m))
    return jax.device_get(st), params, metrics


BATCHES = [_batch(16, start=16 * i) for i in range(3)]


@pytest.fixture(scope="module")
def sharded_run():
  """Three steps on 8 devices (data 2, fsdp 2, tensor 2), shared by several tests."""
  return _run((2, 2, 2), BATCHES)


def test_loss_matches_transformers(tmp_path):
  import torch
  from hf_reference import TINY_GQA, save_hf_model
  from astrollama_jax.formats import hf

  model = save_hf_model(TINY_GQA, tmp_path, seed=5)
  cfg, params = hf.load_hf(str(tmp_path))
  cfg = cfg.replace(compute_dtype="float32")
  ids = np.random.default_rng(0).integers(3, 32000, size=(2, 24)).astype(np.int32)
  batch = {
    "tokens": ids[:, :-1],
    "targets": ids[:, 1:],
    "positions": np.tile(np.arange(23), (2, 1)),
    "segment_ids": np.ones((2, 23), np.int32),
    "loss_mask": np.ones((2, 23), np.float32),
  }
  total, count = loss_lib.lm_loss_sums(
    cfg, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, batch)
  )
  with torch.no_grad():
    ref = model(
      torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long)
    ).loss
  assert count == 46
  np.testing.assert_allclose(float(total / count), float(ref), rtol=1e-5)


def test_chunked_loss_equals_full_loss_and_gradient():
  params = llama.init_params(CFG, seed=1)
  b = jax.tree.map(jnp.asarray, _batch(4))
  full = jax.value_and_grad(lambda p: loss_lib.lm_loss_sums(CFG, p, b)[0])(params)
  chunked = jax.value_and_grad(lambda p: loss_lib.lm_loss_sums(CFG, p, b, chunk_size=8)[0])(params)
  np.testing.assert_allclose(full[0], chunked[0], rtol=1e-6)
  jax.tree.map(
    lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6), full[1], chunked[1]
  )
  with pytest.raises(ValueError, match="does not divide"):
    loss_lib.lm_loss_sums(CFG, params, b, chunk_size=5)


def test_loss_ignores_padding_and_masked_positions():
  params = llama.init_params(CFG, seed=1)
  b = _batch(2)
  total, count = loss_lib.lm_loss_sums(CFG, params, jax.tree.map(jnp.asarray, b))
  assert count == b["loss_mask"].sum() and count < b["loss_mask"].size
  poisoned = dict(b, targets=np.where(b["loss_mask"] > 0, b["targets"], 31999))
  total2, _ = loss_lib.lm_loss_sums(CFG, params, jax.tree.map(jnp.asarray, poisoned))
  assert float(total) == float(total2)


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


def test_sharded_step_equals_single_device_step(sharded_run):
  _, one, m_one = _run((1, 1, 1), BATCHES, devices=jax.devices()[:1])
  _, eight, m_eight = sharded_run
  for a, b in zip(m_one, m_eight):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  assert m_one[-1]["loss"] < m_one[0]["loss"]
  _close(one[-1], eight[-1])


def test_grad_accumulation_equals_one_big_batch(sharded_run):
  _, big, m_big = sharded_run
  _, acc, m_acc = _run((2, 2, 2), BATCHES[:2], grad_accum=4, loss_chunk=8)
  for a, b in zip(m_big, m_acc):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["tokens"] == b["tokens"]
  _close(big[1], acc[1])


def test_nonfinite_step_is_skipped_and_counted(sharded_run):
  good0, good1 = BATCHES[:2]
  bad = dict(good0, loss_mask=np.where(good0["loss_mask"] > 0, np.nan, 0).astype(np.float32))
  st, params, metrics = _run((2, 2, 2), [good0, bad, bad, good1])
  assert [int(m["skipped"]) for m in metrics] == [0, 1, 1, 0]
  assert int(st.nonfinite_total) == 2 and int(st.nonfinite_run) == 0 and int(st.step) == 4
  assert not np.isfinite(metrics[1]["loss"])
  # The skipped steps changed nothing: the same parameters as training on the good batches only.
  _, ref, ref_metrics = sharded_run
  jax.tree.map(np.testing.assert_array_equal, params[0], params[2])
  jax.tree.map(np.testing.assert_array_equal, ref[1], params[3])
  assert metrics[3]["lr"] == ref_metrics[1]["lr"]  # the schedule only advances on applied updates


def test_bfloat16_moments_track_float32():
  params = {"w": jnp.linspace(-1, 1, 4096).reshape(64, 64), "norm": {"scale": jnp.ones((2, 64))}}
  grads = jax.tree.map(
    lambda p: 0.01 * jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params
  )
  results = {}
  for dtype in ("float32", "bfloat16"):
    tx, _ = optimizer.make_optimizer(
      _hparams(moments_dtype=dtype, weight_decay=0.1), total_steps=10
    )
    opt = tx.init(params)
    for _ in range(3):
      updates, opt = jax.jit(tx.update)(grads, opt, params)
    floats = {x.dtype for x in jax.tree.leaves(opt) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(dtype)}
    results[dtype] = updates
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-5),
    results["float32"],
    results["bfloat16"],
  )


def test_weight_decay_spares_norm_scales():
  params = {"w": jnp.ones((4, 4)), "layers": {"input_norm": {"scale": jnp.ones((2, 4))}}}
  tx, _ = optimizer.make_optimizer(_hparams(weight_decay=0.5), total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert float(jnp.abs(updates["layers"]["input_norm"]["scale"]).max()) == 0.0
  assert float(updates["w"][0, 0]) < 0.0


def test_schedule_warmup_then_cosine():
  hp = _hparams(learning_rate=1.0, warmup_ratio=0.1, end_lr_ratio=0.1)
  sched = optimizer.make_schedule(hp.schedule, 100)
  lrs = np.array([float(sched(n)) for n in range(100)])
  np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=1e-6)  # 10 warmup updates
  assert np.all(np.diff(lrs[10:]) < 0) and lrs[-1] == pytest.approx(0.1)
  np.testing.assert_allclose(lrs[54], 0.1 + 0.9 * 0.5, rtol=1e-6)  # halfway through the decay
