"""The train state (params, optimizer state, step, RNG, skip counters) and its shardings.

The state is one pytree so that the train step can take it with explicit shardings and donate
it whole. Parameters are float32 master weights sharded by their logical axes; every optimizer
leaf that mirrors a parameter (Adam's moments) gets that parameter's sharding, everything else
(counters) is replicated.

With LoRA (``config.lora.rank > 0``) ``params`` are the adapters only, so gradients and
optimizer state exist for them alone; the base model rides along in ``frozen`` (in
``lora.base_dtype``, never updated, never saved: a LoRA checkpoint names its base instead).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from astrollama_jax.model import llama, lora_params
from astrollama_jax.model import lora as lora_lib
from astrollama_jax.model.config import LlamaConfig


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. ``rng`` is raw key data (uint32[2]) so it saves as JSON."""

  step: jax.Array  # int32 scalar: optimizer steps taken (applied or skipped)
  params: Any  # plain nested dict, float32 master weights
  opt_state: Any
  rng: jax.Array  # uint32[2]
  nonfinite_total: jax.Array  # int32 scalar: steps skipped for a non-finite loss or gradient
  nonfinite_run: jax.Array  # int32 scalar: of those, how many in a row up to now
  frozen: Any = None  # LoRA: the base parameters (not trained, not checkpointed)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(
  opt_shapes: Any, param_shapes: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """Shard optimizer leaves like the parameter they mirror (matched by dict path and shape).

  Matching by the trailing dict keys works for any optax chain (moments live under the same
  keys as the parameters); a leaf that matches no parameter, like a step count, is replicated.
  """
  by_path = {}
  for path, shape in jax.tree_util.tree_flatten_with_path(param_shapes)[0]:
    by_path[_keys(path)] = shape.shape
  shard_of = {_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in by_path and by_path[suffix] == tuple(leaf.shape):
        return shard_of[suffix]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def abstract_state(
  cfg: LlamaConfig,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  lora: lora_lib.LoraSpec | None = None,
  base_dtype: str | None = None,
) -> tuple[Any, Any]:
  """(TrainState of ShapeDtypeStructs, TrainState of NamedShardings): nothing is allocated.

  With ``lora`` the trained ``params`` are its adapters and ``frozen`` the base model, held in
  ``base_dtype`` (default: ``cfg.param_dtype``).
  """
  frozen = frozen_shard = None
  if lora is None:
    params, p_shard = llama.param_shapes(cfg), llama.param_shardings(cfg, mesh)
  else:
    params = lora_params.adapter_shapes(cfg, lora)
    p_shard = lora_params.adapter_shardings(cfg, lora, mesh)
    dtype = jnp.dtype(base_dtype or cfg.param_dtype)
    frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), llama.param_shapes(cfg))
    frozen_shard = llama.param_shardings(cfg, mesh)
  opt = jax.eval_shape(tx.init, params)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  shapes = TrainState(
    step=scalar,
    params=params,
    opt_state=opt,
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    nonfinite_total=scalar,
    nonfinite_run=scalar,
    frozen=frozen,
  )
  replicated = NamedSharding(mesh, P())
  shardings = TrainState(
    step=replicated,
    params=p_shard,
    opt_state=opt_state_shardings(opt, params, p_shard, mesh),
    rng=replicated,
    nonfinite_total=replicated,
    nonfinite_run=replicated,
    frozen=frozen_shard,
  )
  return shapes, shardings


def model_params(state: TrainState, lora: lora_lib.LoraSpec | None) -> Any:
  """What the model runs on: ``params``, or the frozen base with the adapters (no dropout).
  Works on a state of arrays and on a state of shardings alike."""
  if lora is None:
    return state.params
  return lora_lib.Adapted(base=state.frozen, adapters=state.params, spec=lora)


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that also carry their target sharding (for AOT lowering and restore)."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def create_state(
  params: Any,
  tx: optax.GradientTransformation,
  shardings: TrainState,
  seed: int,
  lora: tuple[LlamaConfig, lora_lib.LoraSpec, str] | None = None,
) -> TrainState:
  """A fresh state around ``params`` (already on the mesh, or a function making them, which
  then runs inside the same compiled program): optimizer initialised in place.

  With ``lora`` = (model config, spec, base dtype), ``params`` is the base: it becomes ``frozen``
  (cast to the base dtype) and fresh adapters (from ``seed``) are what is trained.
  """

  def make(params):
    if callable(params):
      params = params()
    frozen = None
    if lora is not None:
      cfg, spec, base_dtype = lora
      frozen = jax.tree.map(lambda x: x.astype(base_dtype), params)
      params = lora_params.init_adapters(cfg, spec, seed)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
      nonfinite_total=jnp.zeros((), jnp.int32),
      nonfinite_run=jnp.zeros((), jnp.int32),
      frozen=frozen,
    )

  if callable(params):
    return jax.jit(lambda: make(params), out_shardings=shardings)()
  in_shardings = shardings.params if lora is None else shardings.frozen
  return jax.jit(make, in_shardings=(in_shardings,), out_shardings=shardings)(params)
