"""Causal-LM loss over packed rows, as sums (so micro-batches and hosts add up exactly).

A batch row packs several documents: ``targets`` holds each position's next token,
``loss_mask`` says which positions count (0 on padding, on the last token of a document and,
for SFT, on everything but the assistant's replies) and ``segment_ids`` (0 = padding) keep
attention inside a document. The loss returns ``(sum of token NLLs, number of counted tokens)``;
the caller divides once per optimizer step, which makes k micro-batches of n rows give exactly
the gradient of one batch of k*n rows.

The LM head can be applied in sequence chunks (``chunk_size``): the float32 logits of one chunk,
[B, chunk, V], exist at a time, and the chunk is rematerialised in the backward pass, so the
[B, T, V] float32 tensor (42 GB for a 160 x 2048 batch; 1.3 GB per device over 32) is never held.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from astrollama_jax import sharding
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig


def token_nll_sums(
  logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted negative log-likelihoods, sum of weights); logits [..., V] in float32."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((log_z - picked) * weights), jnp.sum(weights)


def head_nll_sums(
  hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, weights: jax.Array, chunk_size: int = 0
) -> tuple[jax.Array, jax.Array]:
  """NLL sums of the LM head over final hidden states [B, T, D], optionally in sequence chunks.

  Logits are accumulated in float32 whatever the compute dtype. With ``chunk_size`` (a divisor
  of T) the chunks run under ``lax.map`` with each chunk rematerialised for the backward pass.
  """
  b, t, _ = hidden.shape
  head = lm_head.astype(hidden.dtype)

  def piece(h, tgt, w):
    logits = jnp.einsum("btd,dv->btv", h, head, preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
    return token_nll_sums(logits, tgt, w)

  if not chunk_size or chunk_size >= t:
    return piece(hidden, targets, weights)
  if t % chunk_size:
    raise ValueError(f"loss_chunk_size {chunk_size} does not divide the sequence length {t}")
  n = t // chunk_size

  def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
    return jnp.moveaxis(x.reshape(b, n, chunk_size, *x.shape[2:]), 1, 0)

  sums, weight_sums = jax.lax.map(
    lambda xs: jax.checkpoint(piece)(*xs), (split(hidden), split(targets), split(weights))
  )
  return jnp.sum(sums), jnp.sum(weight_sums)


def loss_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Which positions count: the loss mask, never on padding (segment 0)."""
  return batch["loss_mask"].astype(jnp.float32) * (batch["segment_ids"] != 0)


def lm_loss_sums(
  cfg: LlamaConfig, params: Any, batch: Mapping[str, jax.Array], chunk_size: int = 0
) -> tuple[jax.Array, jax.Array]:
  """(NLL sum, token count) of a packed batch (tokens, targets, segment_ids, positions, mask);
  ``params`` may be a frozen base with adapters (``lora.Adapted``)."""
  hidden, _ = llama.apply(
    cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True
  )
  return head_nll_sums(
    hidden, llama.head_weight(params), batch["targets"], loss_weights(batch), chunk_size
  )
