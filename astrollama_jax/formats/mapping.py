"""The one table between our parameter tree and Hugging Face ``LlamaForCausalLM`` tensor names.

Every reader and writer of foreign weights goes through ``table``: HF folders in both
directions, and Meta's shards (whose tensors are HF's once merged and re-ordered). HF stores
linear weights as [out, in]; we store [in, out] with heads split out, and stack the layers on a
leading axis. Both directions are read off the same entry, so a round trip is bit-exact by
construction. HF's q/k rows are already in the half-split rotary order our model uses. A tied
model (``tie_embeddings``) has no ``lm_head.weight`` entry, as HF writes none.

``stack_params`` is the one loop that turns per-layer source tensors into our stacked
parameters, one parameter at a time: a format only says how to fetch its tensors (``Read``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import dataclasses
from typing import Any

import numpy as np

from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]
Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
  """A weight file does not fit the config: names the tensor and the shapes."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One entry of the table: our tree path, the HF name and the reshapes between them.

  Per-layer entries name one HF tensor per layer (``"{i}"`` in ``hf_name``) and one stacked
  parameter of ours; ``from_hf``/``to_hf`` transform a single layer's tensor.
  """

  path: Path
  hf_name: str
  from_hf: Transform
  to_hf: Transform

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name

  def hf_names(self, n_layers: int) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(n_layers)] if self.per_layer else [self.hf_name]


def table(cfg: LlamaConfig) -> list[Tensor]:
  """Every parameter of ``cfg``'s model, in HF's order within a layer."""
  d, h, kh, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  same = lambda w: w
  T = lambda w: w.T

  def heads(n: int) -> tuple[Transform, Transform]:  # [n*hd, d] <-> [d, n, hd]
    return lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T

  layer = "model.layers.{i}."
  return [
    Tensor(("embed",), "model.embed_tokens.weight", same, same),
    Tensor(("layers", "attn", "q_proj"), layer + "self_attn.q_proj.weight", *heads(h)),
    Tensor(("layers", "attn", "k_proj"), layer + "self_attn.k_proj.weight", *heads(kh)),
    Tensor(("layers", "attn", "v_proj"), layer + "self_attn.v_proj.weight", *heads(kh)),
    Tensor(
      ("layers", "attn", "o_proj"),
      layer + "self_attn.o_proj.weight",
      lambda w: w.T.reshape(h, hd, d),
      lambda w: w.reshape(h * hd, d).T,
    ),
    Tensor(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", T, T),
    Tensor(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", T, T),
    Tensor(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", T, T),
    Tensor(("layers", "input_norm", "scale"), layer + "input_layernorm.weight", same, same),
    Tensor(
      ("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight", same, same
    ),
    Tensor(("norm", "scale"), "model.norm.weight", same, same),
  ] + ([] if cfg.tie_embeddings else [Tensor(("lm_head",), "lm_head.weight", T, T)])


def num_tensors(cfg: LlamaConfig) -> int:
  """How many HF tensors (per-layer ones counted per layer) the model has."""
  return sum(len(t.hf_names(cfg.n_layers)) for t in table(cfg))


def get_path(tree: Params, path: Path) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def set_path(tree: Params, path: Path, value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# --- foreign tensors -> our stacked parameters --------------------------------------------------

# ``read(entry, hf_shape)`` yields the entry's tensors in HF layout, one per layer in layer order
# (one for a non-layer entry); ``hf_shape`` is the shape each must have. An array may stop being
# valid once the next one is requested: it is copied into the stacked parameter before that.
Read = Callable[[Tensor, tuple[int, ...]], Iterable[np.ndarray]]


def stack_params(
  cfg: LlamaConfig,
  read: Read,
  dtype: str | None = None,
  progress: Callable[[str, np.ndarray], None] | None = None,
) -> Iterator[tuple[Path, np.ndarray]]:
  """Yield (our path, stacked numpy array) one parameter at a time, checking every shape.

  Host memory holds one stacked parameter plus what ``read`` keeps of its source. ``dtype``
  casts on the way (default: the source's). ``progress(hf_name, tensor)`` follows every tensor.
  """
  shapes = llama.param_shapes(cfg)
  out_dtype = np.dtype(dtype) if dtype else None
  for entry in table(cfg):
    target = get_path(shapes, entry.path).shape
    expected = tuple(
      entry.to_hf(np.empty(target[1:] if entry.per_layer else target, np.int8)).shape
    )
    names = entry.hf_names(cfg.n_layers)
    stacked, i = None, -1
    for i, w in enumerate(read(entry, expected)):  # run to the end: the reader's cleanup follows
      if tuple(w.shape) != expected:
        raise ConversionError(
          f"tensor {names[i]!r} has shape {tuple(w.shape)} but the config expects {expected}"
        )
      if progress:
        progress(names[i], w)
      if stacked is None:
        stacked = np.empty(target, out_dtype or w.dtype)
      stacked[i if entry.per_layer else ...] = entry.from_hf(w)  # a copy: no view into a file
      del w
    if i + 1 != len(names):
      raise ConversionError(
        f"{entry.hf_name}: the source gave {i + 1} tensors, expected {len(names)}"
      )
    yield entry.path, stacked
    del stacked


# --- our parameters -> HF tensors ----------------------------------------------------------------


def hf_order(cfg: LlamaConfig) -> Iterator[tuple[str, Tensor, int | None]]:
  """(HF name, table entry, layer or None) of every HF tensor, in HF's order (layer by layer)."""
  entries = table(cfg)
  layered = [t for t in entries if t.per_layer]
  embed, *tail = [t for t in entries if not t.per_layer]
  yield embed.hf_name, embed, None
  for i in range(cfg.n_layers):
    for t in layered:
      yield t.hf_name.format(i=i), t, i
  for t in tail:
    yield t.hf_name, t, None


def hf_shapes(
  cfg: LlamaConfig, params: Params, dtype: str | None = None
) -> Iterator[tuple[str, tuple[int, ...], np.dtype]]:
  """(HF name, shape, dtype) of every tensor ``hf_tensors`` yields, without reading any."""
  for name, t, i in hf_order(cfg):
    x = get_path(params, t.path)
    shape = tuple(x.shape) if i is None else tuple(x.shape[1:])
    # an untouched int8 buffer: the transforms are views, so no page of it is ever written
    yield name, tuple(t.to_hf(np.empty(shape, np.int8)).shape), np.dtype(dtype or x.dtype)


def hf_tensors(
  cfg: LlamaConfig, params: Params, dtype: str | None = None
) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (HF name, numpy array) for every tensor, in HF's order, one at a time.

  Only the layer needed is taken of a stacked parameter (``x[i]``), so a lazily read one
  (``checkpoints.reader.StoredArray``) is read one HF tensor at a time.
  """
  out_dtype = np.dtype(dtype) if dtype else None
  for name, t, i in hf_order(cfg):
    x = get_path(params, t.path)
    x = np.asarray(x if i is None else x[i])  # gathers a sharded jax.Array
    x = x if out_dtype is None else x.astype(out_dtype)
    yield name, np.ascontiguousarray(t.to_hf(x))


class LazyArray:
  """An array read (or computed) slice by slice on indexing: ``shape``, ``dtype``, ``size`` and
  ``ndim`` like numpy's, so the stacking loop and the writers take it for one."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def ndim(self) -> int:
    return len(self.shape)
