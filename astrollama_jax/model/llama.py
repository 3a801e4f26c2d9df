"""The LLaMA decoder: embeddings, a scanned stack of layers, final norm, output head.

Layers are created with ``nnx.vmap`` (parameters stacked on a leading ``layers`` axis) and run
with ``jax.lax.scan``, so compile time does not grow with depth; each layer body is wrapped in
``jax.checkpoint`` with the configured remat policy.

Outside the module the parameters travel as a plain nested dict of arrays (``params``): that
is what conversion, sharding, Orbax, the optimizer and export all speak. ``apply`` rebuilds the
module from it. The head is ``lm_head`` [D, V], or with ``tie_embeddings`` the embedding table
transposed (no ``lm_head`` entry): ``head_weight`` is the one place that knows which.
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from astrollama_jax import sharding
from astrollama_jax.model import lora as lora_lib
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.model.layers import DecoderLayer, RMSNorm, param, rope_cos_sin, rope_inv_freq

Params = dict[str, Any]

_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "qkv_out": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"),
  "minimal": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_hidden"),
}


class Llama(nnx.Module):
  """LLaMA causal LM. ``__call__`` returns (logits or hidden states, updated KV cache)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    std = cfg.initializer_range
    self.embed = param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg.pdtype, std)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(r: nnx.Rngs):
      return DecoderLayer(cfg, rngs=r)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg.pdtype, std)

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: dict[str, Any] | None = None,
    return_hidden: bool = False,
    lora: lora_lib.Adapted | None = None,
  ):
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    start = 0 if cache is None else cache["index"]
    q_idx = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
    x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))

    graphdef, layer_state = nnx.split(self.layers)

    def body(carry, xs):
      layer_params, layer_cache, layer_lora = xs
      layer = nnx.merge(graphdef, layer_params)
      if layer_cache is not None:
        layer_cache = {**layer_cache, "index": start, "segment_ids": cache["segment_ids"]}
      if layer_lora is not None:
        layer_lora = lora_lib.LayerLora(layer_lora[0], lora.spec, layer_lora[1])
      y, new_cache = layer(carry, cos, sin, q_idx, segment_ids, layer_cache, layer_lora)
      return y, new_cache

    if cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=_POLICIES[cfg.remat_policy], prevent_cse=False)
    layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    layer_loras = None
    if lora is not None:  # adapters are stacked on the same leading layers axis
      layer_loras = (lora.adapters["layers"], lora_lib.layer_keys(lora.rng, cfg.n_layers))
    x, new_kv = jax.lax.scan(body, x, (layer_state, layer_caches, layer_loras))
    x = self.norm(x)

    new_cache = None
    if cache is not None:
      new_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, 1)
      new_cache = {"k": new_kv["k"], "v": new_kv["v"], "segment_ids": new_seg, "index": start + t}
    if return_hidden:
      return x, new_cache
    head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(x.dtype))
    return sharding.constrain(logits, ("batch", "seq", "act_vocab")), new_cache


# --- functional API over plain parameter dicts -------------------------------------------------


@functools.lru_cache(maxsize=32)
def _abstract(cfg: LlamaConfig):
  # Shapes only: outside any mesh context, or Flax would read the logical names as mesh axes.
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  return graphdef, state


def param_shapes(cfg: LlamaConfig) -> Params:
  """``jax.ShapeDtypeStruct`` for every parameter, as a plain nested dict."""
  _, state = _abstract(cfg)
  return nnx.to_pure_dict(state)


def logical_axes(cfg: LlamaConfig) -> Params:
  """Logical axis names (tuples) for every parameter, same tree as ``param_shapes``."""
  _, state = _abstract(cfg)
  names = jax.tree.map(
    lambda v: _LogicalAxes(v.get_metadata().get("out_sharding") or ()),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return jax.tree.map(tuple, nnx.to_pure_dict(names), is_leaf=lambda x: isinstance(x, _LogicalAxes))


class _LogicalAxes(tuple):
  """A tuple that pytrees treat as one leaf."""


jax.tree_util.register_pytree_node(
  _LogicalAxes, lambda x: ((), tuple(x)), lambda aux, _: _LogicalAxes(aux)
)


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: sharding.Rules | None = None) -> Params:
  return sharding.tree_shardings(mesh, logical_axes(cfg), param_shapes(cfg), rules)


def init_params(cfg: LlamaConfig, seed: int = 0, mesh: Mesh | None = None) -> Params:
  """Random parameters, created already sharded (jit with output shardings) on ``mesh``.

  Each device materialises only its own shards, so a 7B or 70B model never sits whole on
  one host.
  """

  def init():
    return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param))

  out_shardings = param_shardings(cfg, mesh) if mesh is not None else None
  return jax.jit(init, out_shardings=out_shardings)()


def bind(cfg: LlamaConfig, params: Params) -> Llama:
  """A ``Llama`` module whose parameters are ``params`` (no copy)."""
  graphdef, state = _abstract(cfg)
  state = jax.tree.map(lambda x: x, state)  # fresh container, same structure
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def apply(
  cfg: LlamaConfig,
  params: Params | lora_lib.Adapted,
  tokens: jax.Array,
  positions: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  cache: dict[str, Any] | None = None,
  return_hidden: bool = False,
):
  """Forward pass over plain parameters, or a frozen base with LoRA adapters (``Adapted``):
  (logits [B,T,V] or hidden [B,T,D], new cache)."""
  if isinstance(params, lora_lib.Adapted):
    return bind(cfg, params.base)(tokens, positions, segment_ids, cache, return_hidden, params)
  return bind(cfg, params)(tokens, positions, segment_ids, cache, return_hidden)


def base_params(params: Params | lora_lib.Adapted) -> Params:
  """The plain parameters (the frozen base of an ``Adapted``)."""
  return params.base if isinstance(params, lora_lib.Adapted) else params


def head_weight(params: Params | lora_lib.Adapted) -> jax.Array:
  """The output head [D, V]: ``lm_head``, or the embedding table transposed when tied."""
  base = base_params(params)
  return base["lm_head"] if "lm_head" in base else base["embed"].T


# --- KV cache --------------------------------------------------------------------------------

CACHE_LOGICAL = {
  "k": ("layers", "batch", "cache_seq", "act_kv_heads", None),
  "v": ("layers", "batch", "cache_seq", "act_kv_heads", None),
  "segment_ids": ("batch", "cache_seq"),
  "index": (),
}


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
  """An empty KV cache: stacked per layer, slots filled left to right from ``index``."""
  dtype = dtype or cfg.dtype
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {
    "k": jnp.zeros(shape, dtype),
    "v": jnp.zeros(shape, dtype),
    "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


def shard_params(cfg: LlamaConfig, params: Params, mesh: Mesh) -> Params:
  """Place (host or device) parameters onto ``mesh`` by the logical-axis rules."""
  return jax.device_put(params, param_shardings(cfg, mesh))
