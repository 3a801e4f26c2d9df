"""The shapes, logical axes, shardings and initial values of LoRA adapters for a model config.

These read the base model's parameter shapes and axes (``model/llama.py``), which itself applies
adapters (``model/lora.py``); keeping them here, above both, leaves the model's modules without an
import circle: ``layers -> lora``, ``llama -> layers, lora``, ``lora_params -> llama, lora``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from astrollama_jax import sharding
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.model.lora import TARGETS, A, B, LoraSpec, split_eq


def _base_entry(tree: Any, target: str) -> Any:
  module, weight, _ = TARGETS[target]
  return tree["layers"][module][weight]


def _in_out(target: str) -> tuple[int, int]:
  """How many leading (input) and trailing (output) dims the target's weight has."""
  _, ins, outs = split_eq(TARGETS[target][2])
  return len(ins), len(outs)


def adapter_logical_axes(cfg: LlamaConfig, spec: LoraSpec) -> dict[str, Any]:
  """Logical axes: A = (layers, in axes..., lora_rank), B = (layers, lora_rank, out axes...)."""
  base = llama.logical_axes(cfg)
  out: dict[str, Any] = {}
  for t in spec.targets:
    module, weight, _ = TARGETS[t]
    layers, *names = _base_entry(base, t)
    n_in, _ = _in_out(t)
    out.setdefault("layers", {}).setdefault(module, {})[weight] = {
      A: (layers, *names[:n_in], "lora_rank"),
      B: (layers, "lora_rank", *names[n_in:]),
    }
  return out


def adapter_shapes(cfg: LlamaConfig, spec: LoraSpec, dtype: Any = jnp.float32) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` of every adapter factor, same tree as ``adapter_logical_axes``."""
  base = llama.param_shapes(cfg)
  out: dict[str, Any] = {}
  for t in spec.targets:
    module, weight, _ = TARGETS[t]
    layers, *dims = _base_entry(base, t).shape
    n_in, _ = _in_out(t)
    out.setdefault("layers", {}).setdefault(module, {})[weight] = {
      A: jax.ShapeDtypeStruct((layers, *dims[:n_in], spec.rank), dtype),
      B: jax.ShapeDtypeStruct((layers, spec.rank, *dims[n_in:]), dtype),
    }
  return out


def init_adapters(cfg: LlamaConfig, spec: LoraSpec, seed: int) -> dict[str, Any]:
  """Fresh float32 adapters: A ~ U(+-1/sqrt(fan_in)) (peft's kaiming_uniform(a=sqrt(5))), B = 0."""
  shapes = adapter_shapes(cfg, spec)
  key = jax.random.key(seed + 1_000_003, impl="threefry2x32")
  out: dict[str, Any] = {}
  for i, t in enumerate(spec.targets):
    module, weight, _ = TARGETS[t]
    entry = _base_entry(shapes, t)
    a_shape = entry[A].shape
    bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
    out.setdefault("layers", {}).setdefault(module, {})[weight] = {
      A: jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound),
      B: jnp.zeros(entry[B].shape, jnp.float32),
    }
  return out


def adapter_shardings(cfg: LlamaConfig, spec: LoraSpec, mesh: Any) -> dict[str, Any]:
  """Where each adapter factor lives on ``mesh`` (the rules table, as for any parameter)."""
  return sharding.tree_shardings(mesh, adapter_logical_axes(cfg, spec), adapter_shapes(cfg, spec))


def num_adapter_params(cfg: LlamaConfig, spec: LoraSpec) -> int:
  """How many trainable numbers the adapters hold."""
  return sum(math.prod(s.shape) for s in jax.tree.leaves(adapter_shapes(cfg, spec)))
