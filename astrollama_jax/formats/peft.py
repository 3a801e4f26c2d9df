"""LoRA adapters as a Hugging Face peft adapter folder, and merged into the weights.

peft's layout: ``adapter_config.json`` and ``adapter_model.safetensors`` with, per adapted
``nn.Linear`` (weight [out, in]), ``...q_proj.lora_A.weight`` [r, in] and ``...lora_B.weight``
[out, r]; the layer adds ``(lora_alpha / r) * B @ A`` to its weight. Our factors are A [in...,
r] and B [r, out...] per layer, so peft's are their flattened transposes, and
``PeftModel.from_pretrained(base, folder)`` computes what the merged export holds.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from astrollama_jax.model.lora import TARGETS, A, B, LoraSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def module_names(spec: LoraSpec) -> list[str]:
  """peft's ``target_modules``: the HF names of the adapted linears (q_proj, ..., down_proj)."""
  return [TARGETS[t][1] for t in spec.targets]


def peft_tensors(spec: LoraSpec, adapters: dict[str, Any]) -> dict[str, np.ndarray]:
  """peft's tensor names -> float32 arrays, for every layer and target."""
  out = {}
  for t in spec.targets:
    module, weight, _ = TARGETS[t]
    ad = adapters["layers"][module][weight]
    a, b = np.asarray(ad[A], np.float32), np.asarray(ad[B], np.float32)
    for i in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[module]}.{weight}"
      out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, spec.rank).T)
      out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(spec.rank, -1).T)
  return out


def adapter_config(spec: LoraSpec, base_model: str) -> dict[str, Any]:
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": spec.rank,
    "lora_alpha": spec.alpha,
    "lora_dropout": spec.dropout,
    "target_modules": module_names(spec),
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "revision": None,
  }


def save_adapter(folder: str, spec: LoraSpec, adapters: dict[str, Any], base_model: str) -> int:
  """Write ``folder`` (``adapter_config.json``, ``adapter_model.safetensors``); returns the
  number of tensors. The caller makes the folder appear atomically."""
  from safetensors.numpy import save_file

  tensors = peft_tensors(spec, adapters)
  save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
    json.dump(adapter_config(spec, base_model), f, indent=2)
  return len(tensors)
