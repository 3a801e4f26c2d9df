"""LoRA adapters: low-rank updates of the frozen projection weights (``config.lora``).

A targeted weight ``W`` (any of q, k, v, o, gate, up, down; stacked over layers like every layer
weight) gets two trainable factors: ``lora_a`` with the weight's input dims and a trailing
``lora_rank`` axis, ``lora_b`` with ``lora_rank`` then the weight's output dims. The layer
computes ``x W + (alpha / rank) * (dropout(x) A) B``, the Hugging Face peft convention
(``scaling = lora_alpha / r``; A uniform in +-1/sqrt(fan_in), B zero, so a fresh adapter leaves
the model unchanged), which keeps exported adapters exactly peft's. Merging gives
``W + (alpha / rank) * A @ B`` over the rank axis.

Adapters are a plain nested dict under the same keys as the parameters they adapt
(``{"layers": {"attn": {"q_proj": {"lora_a", "lora_b"}}}}``) and carry logical axis names, so
they shard by the rules table like any parameter (``lora_rank`` is replicated by default); their
shapes, axes and initial values for a config are in ``model/lora_params.py``.
Dropout is applied in training only (when a key is given), from a key derived from the train
state's RNG, so a resumed run draws the same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

# target name -> (module, weight, the layer's einsum "x,W->y")
TARGETS: dict[str, tuple[str, str, str]] = {
  "q": ("attn", "q_proj", "btd,dhk->bthk"),
  "k": ("attn", "k_proj", "btd,dhk->bthk"),
  "v": ("attn", "v_proj", "btd,dhk->bthk"),
  "o": ("attn", "o_proj", "bthk,hkd->btd"),
  "gate": ("mlp", "gate_proj", "btd,df->btf"),
  "up": ("mlp", "up_proj", "btd,df->btf"),
  "down": ("mlp", "down_proj", "btf,fd->btd"),
}
A, B = "lora_a", "lora_b"
_INDEX = {(m, w): i for i, (m, w, _) in enumerate(TARGETS.values())}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What is adapted and how: rank, alpha (scaling = alpha / rank), dropout, targets."""

  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1 for adapters, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(f"lora.targets {self.targets!r}: give distinct names of {tuple(TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict[str, Any]:
    return {
      "rank": self.rank,
      "alpha": self.alpha,
      "dropout": self.dropout,
      "targets": list(self.targets),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
    return cls(
      rank=int(d["rank"]),
      alpha=float(d["alpha"]),
      dropout=float(d.get("dropout", 0.0)),
      targets=tuple(d["targets"]),
    )


def parse_targets(text: Any) -> tuple[str, ...]:
  """``"q,k,v"`` (or a sequence of names) -> ("q", "k", "v"), in the given order."""
  if isinstance(text, str):
    return tuple(t.strip() for t in text.split(",") if t.strip())
  return tuple(text)


def spec_from_config(config: Any) -> LoraSpec | None:
  """The run's adapters (``config.lora``), or None when ``lora.rank`` is 0 (full fine-tuning)."""
  section = config.get("lora") if hasattr(config, "get") else None
  if section is None or not section.rank:
    return None
  return LoraSpec(
    rank=int(section.rank),
    alpha=float(section.alpha),
    dropout=float(section.dropout),
    targets=parse_targets(section.targets),
  )


def split_eq(eq: str) -> tuple[str, str, str]:
  """(x letters, weight input letters, weight output letters) of an einsum "x,W->y"."""
  inputs, _ = eq.split("->")
  x, w = inputs.split(",")
  return x, "".join(c for c in w if c in x), "".join(c for c in w if c not in x)


def delta(target: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale * A @ B`` over the rank axis, shaped like one layer's (or the stacked) weight."""
  _, ins, outs = split_eq(TARGETS[target][2])
  lead = "l" if a.ndim == len(ins) + 2 else ""
  eq = f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}"
  return scale * jnp.einsum(
    eq, a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )


def merge(params: dict[str, Any], adapters: dict[str, Any], spec: LoraSpec) -> dict[str, Any]:
  """``params`` with every targeted weight replaced by ``W + scale * A @ B`` (computed in float32,
  stored in W's dtype); every other leaf is the same object."""
  out = jax.tree.map(lambda x: x, params)
  for t in spec.targets:
    module, weight, _ = TARGETS[t]
    w = out["layers"][module][weight]
    ad = adapters["layers"][module][weight]
    merged = w.astype(jnp.float32) + delta(t, ad[A], ad[B], spec.scale)
    out["layers"][module][weight] = merged.astype(w.dtype)
  return out


@flax.struct.dataclass
class Adapted:
  """Frozen base parameters plus adapters: what ``llama.apply`` takes in place of ``params``.

  ``rng`` (raw key data, uint32[2]) turns dropout on; None (eval, generation) turns it off.
  """

  base: Any
  adapters: Any
  spec: LoraSpec = flax.struct.field(pytree_node=False)
  rng: Any = None


@dataclasses.dataclass(frozen=True)
class LayerLora:
  """One layer's adapters inside the scan body (not a pytree)."""

  adapters: dict[str, Any]
  spec: LoraSpec
  rng: jax.Array | None  # this layer's key data, or None: no dropout

  def project(self, x: jax.Array, w: jax.Array, module: str, weight: str, eq: str) -> jax.Array:
    """``einsum(eq, x, w)`` plus the adapter's low-rank branch if ``weight`` is targeted."""
    y = jnp.einsum(eq, x, w.astype(x.dtype))
    ad = self.adapters.get(module, {}).get(weight)
    if ad is None:
      return y
    xs, ins, outs = split_eq(eq)
    if self.rng is not None and self.spec.dropout > 0:
      key = jax.random.fold_in(
        jax.random.wrap_key_data(self.rng, impl="threefry2x32"), _INDEX[(module, weight)]
      )
      keep = jax.random.bernoulli(key, 1.0 - self.spec.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.spec.dropout), 0).astype(x.dtype)
    batch = xs[: len(xs) - len(ins)]
    h = jnp.einsum(f"{xs},{ins}r->{batch}r", x, ad[A].astype(x.dtype))
    low = jnp.einsum(f"{batch}r,r{outs}->{batch}{outs}", h, ad[B].astype(x.dtype))
    return y + (self.spec.scale * low).astype(y.dtype)


def project(
  x: jax.Array, w: jax.Array, module: str, weight: str, eq: str, lora: LayerLora | None
) -> jax.Array:
  """A projection of the layer, with the adapter's branch when ``lora`` targets it."""
  if lora is None:
    return jnp.einsum(eq, x, w.astype(x.dtype))
  return lora.project(x, w, module, weight, eq)


def layer_keys(rng: Any, n_layers: int) -> jax.Array | None:
  """Per-layer dropout key data [n_layers, 2] from the step's key data, or None."""
  if rng is None:
    return None
  key = jax.random.fold_in(jax.random.wrap_key_data(rng, impl="threefry2x32"), 0x10AA)
  return jax.random.key_data(jax.random.split(key, n_layers))
