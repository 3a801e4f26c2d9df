"""The jit-compiled train and eval steps, with explicit shardings and a donated state.

One train step = one optimizer update over the global batch: the batch is cut into
``grad_accum`` micro-batches that a ``lax.scan`` runs one after another, summing float32
gradients and loss sums; the sum is divided by the number of counted tokens once, so the update
equals the one a single batch k times the size would give. A step whose loss or gradient norm is
not finite leaves params and optimizer state untouched and counts itself (``nonfinite_total``,
``nonfinite_run``); the loop stops after too many in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from astrollama_jax import sharding
from astrollama_jax.data.packing import BATCH_KEYS, BATCH_SPEC
from astrollama_jax.model import lora as lora_lib
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.train.loss import lm_loss_sums
from astrollama_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  """Every batch field is [batch, seq], split like the logical ``batch`` axis (data, fsdp)."""
  return {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}


def abstract_batch(rows: int, seq_len: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch argument as shapes (``packing.BATCH_SPEC``) with their shardings."""
  shardings = batch_shardings(mesh)
  return {
    k: jax.ShapeDtypeStruct((rows, seq_len), dtype, sharding=shardings[k])
    for k, dtype in BATCH_SPEC.items()
  }


def split_microbatches(batch: Batch, k: int) -> dict[str, jax.Array]:
  """[B, T] -> [k, B/k, T], micro-batch i taking rows i, i+k, i+2k ...

  Interleaving (rather than contiguous blocks) keeps every micro-batch spread over all devices:
  each device's contiguous block of rows contributes B/(k*devices) rows to each micro-batch.
  """
  out = {}
  for name, x in batch.items():
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch of {b} rows cannot be split into {k} micro-batches")
    x = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
    out[name] = sharding.constrain(x, (None, "batch", "seq"))
  return out


def make_train_step(
  cfg: LlamaConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  state_shardings: TrainState,
  mesh: Mesh,
  *,
  grad_accum: int = 1,
  loss_chunk: int = 0,
  lora: lora_lib.LoraSpec | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``, jitted with the state donated; traced with the
  sharding rules in force now (those ``state_shardings`` were computed with).

  With ``lora`` the gradient is taken with respect to the adapters (``state.params``) only; the
  base (``state.frozen``) passes through unchanged, and adapter dropout draws its masks from
  the step's RNG (and the micro-batch index), so a resumed run repeats them exactly.

  Metrics (replicated scalars): loss (mean NLL per counted token), grad_norm (before clipping),
  lr (the rate this update used), tokens (counted tokens), skipped (1 if not applied).
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
  param_shardings = state_shardings.params

  def loss_fn(params, batch, frozen, rng):
    if lora is not None:
      params = lora_lib.Adapted(base=frozen, adapters=params, spec=lora, rng=rng)
    return lm_loss_sums(cfg, params, batch, loss_chunk)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_rng(rng, i):
    key = jax.random.fold_in(jax.random.wrap_key_data(rng, impl="threefry2x32"), i)
    return jax.random.key_data(key)

  def sums_and_grads(params, batch, frozen, rng):
    if grad_accum == 1:
      (loss_sum, weight), grads = grad_fn(params, batch, frozen, micro_rng(rng, 0))
      return loss_sum, weight, grads

    def body(carry, xs):
      g_acc, l_acc, w_acc = carry
      i, micro = xs
      (loss_sum, weight), grads = grad_fn(params, micro, frozen, micro_rng(rng, i))
      g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
      g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
      return (g_acc, l_acc + loss_sum, w_acc + weight), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    xs = (jnp.arange(grad_accum), split_microbatches(batch, grad_accum))
    (grads, loss_sum, weight), _ = jax.lax.scan(body, init, xs)
    return loss_sum, weight, grads

  def step(state: TrainState, batch: Batch):
    loss_sum, weight, grads = sums_and_grads(state.params, batch, state.frozen, state.rng)
    denom = jnp.maximum(weight, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    def skip(_):
      return state.params, state.opt_state

    params, opt_state = jax.lax.cond(finite, apply, skip, None)
    applied = state.step - state.nonfinite_total  # updates applied before this one
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      rng=jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
      ),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": schedule(applied),
      "tokens": weight,
      "skipped": (~finite).astype(jnp.int32),
    }
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(
    sharding.keeping_rules(step),
    in_shardings=(state_shardings, batch_shardings(mesh)),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )


def make_eval_step(
  cfg: LlamaConfig, param_shardings: Any, mesh: Mesh, *, loss_chunk: int = 0
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """``eval_step(params, batch) -> (NLL sum, token count)``; sum over batches, then divide."""
  replicated = NamedSharding(mesh, P())

  def eval_step(params, batch):
    return lm_loss_sums(cfg, params, batch, loss_chunk)

  return jax.jit(
    sharding.keeping_rules(eval_step),
    in_shardings=(param_shardings, batch_shardings(mesh)),
    out_shardings=(replicated, replicated),
  )
