"""LLaMA-2 and LLaMA-3 model configuration and presets.

One frozen dataclass holds the architecture and the dtype/remat/attention policy. Presets
mirror Meta's published shapes; the tiny ones keep tests fast while still exercising GQA
and the real 32,000-piece vocabulary. LLaMA 3.1+ adds the "llama3" RoPE frequency scaling
and 3.2's small models tie the output head to the embedding table; both are off by default,
so a LLaMA-2 config and its parameter tree are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
import numpy as np

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_out", "minimal")
# See model/attention.py for what each one is and what "auto" picks per platform.
ATTENTION_IMPLS = ("xla", "jax", "cudnn", "splash", "flash_gpu", "auto")
# "default": plain RoPE; "llama3": LLaMA 3.1+'s frequency scaling (model/layers.py).
ROPE_SCALINGS = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _policy(default: str) -> Any:
  """A field of the execution policy (dtypes, remat, attention), not of the architecture."""
  return dataclasses.field(default=default, metadata={"policy": True})


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture plus execution policy of a LLaMA-2 or LLaMA-3 decoder."""

  vocab_size: int = 32000
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  ffn_dim: int = 11008
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seq_len: int = 4096
  # RoPE frequency scaling; the rope_* numbers are read only when rope_scaling is "llama3".
  rope_scaling: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_seq_len: int = 8192
  # The output head is the embedding table, transposed (no lm_head parameter).
  tie_embeddings: bool = False
  # Execution policy: may differ between a checkpoint and the run that loads it.
  param_dtype: str = _policy("float32")
  compute_dtype: str = _policy("bfloat16")
  remat_policy: str = _policy("none")
  attention_impl: str = _policy("xla")
  initializer_range: float = 0.02

  def __post_init__(self):
    sizes = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
    bad = [f"{k}={getattr(self, k)!r}" for k in sizes if not _positive_int(getattr(self, k))]
    bad += [
      f"{k}={getattr(self, k)!r}"
      for k in ("norm_eps", "rope_theta")
      if not (isinstance(getattr(self, k), (int, float)) and getattr(self, k) > 0)
    ]
    if bad:
      raise ValueError(f"model sizes must be positive: {', '.join(bad)}")
    if self.dim % self.n_heads:
      raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"rope_scaling {self.rope_scaling!r} not in {ROPE_SCALINGS}")
    if self.rope_scaling == "llama3":
      _check_llama3_rope(self)
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(
          f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}"
        )

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def pdtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw: Any) -> LlamaConfig:
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, v, hd = self.dim, self.ffn_dim, self.vocab_size, self.head_dim
    attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
    layer = attn + 3 * d * f + 2 * d
    return self.n_layers * layer + (1 if self.tie_embeddings else 2) * v * d + d

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
    return cls(**d)

  # --- Hugging Face config.json ------------------------------------------------------------
  def to_hf_config(self) -> dict[str, Any]:
    return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": self.vocab_size,
      "hidden_size": self.dim,
      "intermediate_size": self.ffn_dim,
      "num_hidden_layers": self.n_layers,
      "num_attention_heads": self.n_heads,
      "num_key_value_heads": self.n_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": self.max_seq_len,
      "rms_norm_eps": self.norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": self.hf_rope_scaling(),
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": self.tie_embeddings,
      "initializer_range": self.initializer_range,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "pad_token_id": None,
      "pretraining_tp": 1,
      "torch_dtype": self.param_dtype,
    }

  def hf_rope_scaling(self) -> dict[str, Any] | None:
    """The ``rope_scaling`` object of config.json (None without scaling)."""
    if self.rope_scaling != "llama3":
      return None
    return {
      "rope_type": "llama3",
      "factor": self.rope_factor,
      "low_freq_factor": self.rope_low_freq_factor,
      "high_freq_factor": self.rope_high_freq_factor,
      "original_max_position_embeddings": self.rope_original_max_seq_len,
    }

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> LlamaConfig:
    if hf.get("model_type", "llama") != "llama":
      raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'llama'")
    tied = hf.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
      raise ValueError(f"config.json tie_word_embeddings must be true or false, got {tied!r}")
    rope_theta, rope = _read_rope(hf)
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
      raise ValueError(f"head_dim {head_dim} x heads {n_heads} != hidden_size {hf['hidden_size']}")
    kw = dict(
      vocab_size=hf["vocab_size"],
      dim=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      ffn_dim=hf["intermediate_size"],
      norm_eps=hf.get("rms_norm_eps", 1e-5),
      rope_theta=float(rope_theta),
      max_seq_len=hf.get("max_position_embeddings", 4096),
      tie_embeddings=tied,
      **rope,
    )
    kw.update(overrides)
    return cls(**kw)


# The fields a run may change on top of a checkpoint (the rest are its architecture).
POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig) if f.metadata.get("policy"))

_LLAMA3: dict[str, Any] = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
# 3.1 and later: 128K context through the "llama3" scaling of the original 8K positions.
_LLAMA3_1 = dict(
  _LLAMA3,
  max_seq_len=131072,
  rope_scaling="llama3",
  rope_factor=8.0,
  rope_low_freq_factor=1.0,
  rope_high_freq_factor=4.0,
  rope_original_max_seq_len=8192,
)
_LLAMA3_2 = dict(_LLAMA3_1, rope_factor=32.0, tie_embeddings=True)
_L3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)
_L3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)

PRESETS: dict[str, dict[str, Any]] = {
  "llama2_7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
  "llama2_13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
  "llama2_70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
  # LLaMA 3: 128,256-piece vocabulary, GQA with 8 KV heads everywhere, RoPE theta 500,000.
  "llama3_8b": dict(_LLAMA3, max_seq_len=8192, **_L3_8B),
  "llama3_1_8b": dict(_LLAMA3_1, **_L3_8B),
  "llama3_1_70b": dict(_LLAMA3_1, **_L3_70B),
  # For plans only: far beyond what any machine of ours holds.
  "llama3_1_405b": dict(
    _LLAMA3_1, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248
  ),
  "llama3_2_1b": dict(_LLAMA3_2, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
  "llama3_2_3b": dict(_LLAMA3_2, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192),
  "llama3_3_70b": dict(_LLAMA3_1, **_L3_70B),
  # Tiny presets: real vocabulary (so the real tokenizer works), shapes divisible by 4 so
  # every test mesh up to tensor=4 shards them evenly.
  "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=512),
  "tiny_gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128, max_seq_len=512),
  "tiny_70b_shape": dict(
    dim=128, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=256, max_seq_len=512
  ),
  # What the demo trains on two CPU cores in about two minutes (configs/demo.py), with the
  # demo's own tokenizer (data/demo_tokenizer.py): a vocabulary the demo data can fill.
  "demo": dict(
    vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=512
  ),
}


def get_config(preset: str, **overrides: Any) -> LlamaConfig:
  """A preset by name, with field overrides (e.g. ``compute_dtype='float32'``)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
  return LlamaConfig(**{**PRESETS[preset], **overrides})


_NO_SCALING = ("default", "none")


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
  """(``rope_theta``, our rope_* fields) of an HF config; any scaling but "llama3" is refused.

  transformers 4 writes ``rope_theta`` and ``rope_scaling``; transformers 5 writes
  ``rope_parameters`` (``rope_type``, ``rope_theta`` and the scaling's own fields, possibly one
  such dict per attention layer type). Both are read: a model trained with a scaling we do not
  compute would silently see other positions.
  """
  theta = hf.get("rope_theta")
  found: list[dict[str, Any]] = []
  for key in ("rope_scaling", "rope_parameters"):
    value = hf.get(key) or {}
    if not isinstance(value, dict):
      raise ValueError(f"config.json {key} must be an object, got {value!r}")
    nested = value and all(isinstance(v, dict) for v in value.values())
    for params in value.values() if nested else [value]:
      kind = params.get("rope_type", params.get("type")) or "default"
      if kind == "llama3":
        found.append(_llama3_fields(params, key))
      elif kind not in _NO_SCALING:
        raise ValueError(
          f"RoPE scaling {kind!r} (config.json {key}) is not supported: only 'llama3' "
          "scaling is; use a checkpoint trained without another"
        )
      if theta is None and params.get("rope_theta") is not None:
        theta = params["rope_theta"]
  if any(f != found[0] for f in found):
    raise ValueError(f"config.json gives differing llama3 RoPE scalings: {found}")
  return (10000.0 if theta is None else theta), (found[0] if found else {})


def _llama3_fields(params: dict[str, Any], key: str) -> dict[str, Any]:
  missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
  if missing:
    raise ValueError(f"RoPE scaling 'llama3' (config.json {key}) lacks {', '.join(missing)}")
  return dict(
    rope_scaling="llama3",
    rope_factor=params["factor"],
    rope_low_freq_factor=params["low_freq_factor"],
    rope_high_freq_factor=params["high_freq_factor"],
    rope_original_max_seq_len=params["original_max_position_embeddings"],
  )


def _check_llama3_rope(cfg: LlamaConfig) -> None:
  """The llama3 scaling divides by (high - low) and by each factor: all must make sense."""
  nums = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")
  bad = [
    f"{k}={getattr(cfg, k)!r}"
    for k in nums
    if isinstance(getattr(cfg, k), bool)
    or not (isinstance(getattr(cfg, k), (int, float)) and getattr(cfg, k) > 0)
  ]
  if not _positive_int(cfg.rope_original_max_seq_len):
    bad.append(f"rope_original_max_seq_len={cfg.rope_original_max_seq_len!r}")
  if bad:
    raise ValueError(f"llama3 RoPE scaling needs positive numbers: {', '.join(bad)}")
  if cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
    raise ValueError(
      f"llama3 RoPE scaling needs rope_high_freq_factor {cfg.rope_high_freq_factor} > "
      f"rope_low_freq_factor {cfg.rope_low_freq_factor}"
    )


def _positive_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
