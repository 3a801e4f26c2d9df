"""LLaMA building blocks in Flax NNX: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Conventions (the HF ``LlamaForCausalLM`` ones, so that HF weights need no reshuffle beyond
reshapes): rotary embeddings rotate the two *halves* of each head (``rotate_half``); Meta's
interleaved-pair layout is converted at the border (``convert/meta.py``).
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from astrollama_jax.model.attention import attention
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.model.lora import LayerLora, project
from astrollama_jax.sharding import constrain


def param(rngs: nnx.Rngs | None, shape, names, dtype, std: float | None) -> nnx.Param:
  """A parameter carrying its logical axis names (sharded later by the rules table)."""
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class RMSNorm(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None = None):
    self.eps = cfg.norm_eps
    self.scale = param(None, (cfg.dim,), ("norm",), cfg.pdtype, None)

  def __call__(self, x: jax.Array) -> jax.Array:
    # As HF: normalise in float32, cast back, then multiply by the weight.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
  """RoPE inverse frequencies [head_dim / 2] (float32), with the config's scaling.

  "llama3" (LLaMA 3.1+) keeps the high frequencies, divides the low ones (wavelengths beyond
  ``original_max / low_freq_factor``) by ``factor`` and interpolates between: a function of the
  frequency alone, so every position, before or beyond the original context, is rotated by the
  same rule. Computed in float32 as transformers does, so long positions round alike.
  """
  hd = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if cfg.rope_scaling != "llama3":
    return inv_freq
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_seq_len
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin of shape [B, T, head_dim] for integer positions [B, T] (float32)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate [B, T, heads, head_dim] by the half-split convention."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, h, kh, hd, std = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.initializer_range
    self.cfg = cfg
    self.q_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.pdtype, std)
    self.k_proj = param(rngs, (d, kh, hd), ("embed", "kv_heads", "head_dim"), cfg.pdtype, std)
    self.v_proj = param(rngs, (d, kh, hd), ("embed", "kv_heads", "head_dim"), cfg.pdtype, std)
    self.o_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg.pdtype, std)

  def __call__(
    self, x, cos, sin, q_idx, q_seg, cache: dict[str, Any] | None, lora: LayerLora | None = None
  ):
    cfg, dt = self.cfg, x.dtype
    q = project(x, self.q_proj[...], "attn", "q_proj", "btd,dhk->bthk", lora)
    k = project(x, self.k_proj[...], "attn", "k_proj", "btd,dhk->bthk", lora)
    v = project(x, self.v_proj[...], "attn", "v_proj", "btd,dhk->bthk", lora)
    q = constrain(q, ("batch", "seq", "act_heads", None))
    k = constrain(k, ("batch", "seq", "act_kv_heads", None))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = checkpoint_name(q, "q")
    k = checkpoint_name(k, "k")
    v = checkpoint_name(v, "v")
    if cache is None:
      k_all, v_all, k_idx, k_seg, new_cache = k, v, q_idx, q_seg, None
    else:
      # Write this chunk at slot `index`, attend over the whole (masked) cache.
      start = cache["index"]
      k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1)
      k_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], q_seg, start, 1)
      k_idx = jnp.broadcast_to(jnp.arange(k_all.shape[1], dtype=jnp.int32), k_seg.shape)
      new_cache = {"k": k_all, "v": v_all}
      k_all, v_all = k_all.astype(dt), v_all.astype(dt)
    out = attention(
      q, k_all, v_all, q_idx, k_idx, q_seg, k_seg, cfg.attention_impl, cached=cache is not None
    )
    out = checkpoint_name(out, "attn_out")
    y = project(out, self.o_proj[...], "attn", "o_proj", "bthk,hkd->btd", lora)
    return y, new_cache


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f, std = cfg.dim, cfg.ffn_dim, cfg.initializer_range
    self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), cfg.pdtype, std)
    self.up_proj = param(rngs, (d, f), ("embed", "mlp"), cfg.pdtype, std)
    self.down_proj = param(rngs, (f, d), ("mlp", "embed"), cfg.pdtype, std)

  def __call__(self, x, lora: LayerLora | None = None):
    gate = project(x, self.gate_proj[...], "mlp", "gate_proj", "btd,df->btf", lora)
    up = project(x, self.up_proj[...], "mlp", "up_proj", "btd,df->btf", lora)
    h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    h = checkpoint_name(h, "mlp_hidden")
    return project(h, self.down_proj[...], "mlp", "down_proj", "btf,fd->btd", lora)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, q_idx, q_seg, cache=None, lora: LayerLora | None = None):
    h, new_cache = self.attn(self.input_norm(x), cos, sin, q_idx, q_seg, cache, lora)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x), lora)
    return constrain(x, ("batch", "seq", "act_embed")), new_cache
