"""Attention: the dense XLA reference and fused kernels that honour packed-document segment ids.

One entry point, ``attention(q, k, v, q_idx, k_idx, q_seg, k_seg, impl, cached=...)``, serves
training, scoring and decoding. The mask is always the same: causal by slot index, same segment,
never a padding key (segment 0). Implementations:

* ``xla``: einsum scores, dense [B, T, S] mask, softmax in float32. Runs anywhere; the reference.
* ``jax`` / ``cudnn``: ``jax.nn.dot_product_attention`` with the dense mask. Its cuDNN path turns
  the boolean mask into a dense additive bias [B, 1, T, S] (``combine_bias_and_mask``), so it
  keeps the segment semantics but streams a T x S tensor per row and layer.
* ``splash``: the Pallas TPU splash-attention kernel (static causal mask + segment ids, grouped
  query heads natively), wrapped in ``shard_map`` over the batch and head mesh axes. Never forms
  a T x S tensor; fully masked blocks (across the causal edge) are skipped.
* ``flash_gpu``: the Pallas GPU (Triton) flash-attention kernel with segment ids, key/value heads
  repeated to the query heads (the kernel has no grouped-query mode).
* ``auto``: ``splash`` on TPU, ``cudnn`` on GPU (NVIDIA's kernel, the one GPU configs used), and
  ``xla`` on CPU, where the fused kernels would only run in the slow Pallas interpreter.

The fused kernels need a self-attention shape (no KV cache: query slot i is key slot i), which
training and scoring always have. With a KV cache (decoding one token, or a prompt chunk against
the cache) they, and ``auto``, fall back to ``xla``: a single query row is a matrix-vector
product bound by reading the cache, which one einsum pass over it already does at full
bandwidth, while the kernels pad the query to a 128-row block (128x the work) and would need the
cache's causal offset to be static.

Padding queries (segment 0) are unspecified in every implementation (the fused kernels let them
attend to earlier padding, ``xla`` spreads them uniformly); nothing reads them, since losses and
scores weight padding by zero and no real query attends to a padding key.

Off their platform the Pallas kernels run in interpret mode automatically (CPU tests check them
against ``xla``). The platform is that of the mesh being traced for (so compiling for a TPU
topology from a CPU host emits the real kernel), else JAX's default backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from astrollama_jax import sharding

_NEG_INF = -1e30
FUSED_IMPLS = ("splash", "flash_gpu")
_BLOCK = 128  # the kernels' sequence tile; sequences are padded up to a multiple of it


def attention_mask(q_idx, k_idx, q_seg, k_seg) -> jax.Array:
  """[B, T, S] boolean: causal by slot index, same segment, never padding (segment 0)."""
  causal = k_idx[:, None, :] <= q_idx[:, :, None]
  same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  return causal & same


def dot_attention(q, k, v, mask, impl: str) -> jax.Array:
  """Grouped-query attention. q [B,T,H,D], k/v [B,S,K,D], mask [B,T,S] -> [B,T,H,D]."""
  if impl in ("jax", "cudnn"):
    return jax.nn.dot_product_attention(
      q, k, v, mask=mask[:, None], implementation=None if impl == "jax" else "cudnn"
    )
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (d**-0.5)
  scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def target_platform() -> str:
  """'tpu', 'gpu' or 'cpu': the platform of the mesh in context, else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  platform = device.platform if device is not None else jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The concrete implementation ``impl`` stands for on ``platform`` (``auto`` picks one)."""
  if impl != "auto":
    return impl
  return {"tpu": "splash", "gpu": "cudnn"}.get(platform or target_platform(), "xla")


def attention(q, k, v, q_idx, k_idx, q_seg, k_seg, impl: str, *, cached: bool = False):
  """Masked grouped-query attention, q [B,T,H,D], k/v [B,S,K,D] -> [B,T,H,D].

  ``q_idx``/``k_idx`` are slot indices [B,T]/[B,S], ``q_seg``/``k_seg`` segment ids (0 =
  padding). ``cached`` says k/v come from a KV cache (decoding), where fused kernels give way to
  the dense path (see the module docstring).
  """
  if cached and impl in FUSED_IMPLS + ("auto",):
    impl = "xla"
  impl = resolve_impl(impl)
  if impl not in FUSED_IMPLS:
    return dot_attention(q, k, v, attention_mask(q_idx, k_idx, q_seg, k_seg), impl)
  if q.shape[1] != k.shape[1]:
    raise ValueError(
      f"{impl} attention needs self-attention shapes, got T={q.shape[1]}, S={k.shape[1]}"
    )
  kernel = splash_attention if impl == "splash" else flash_gpu_attention
  return kernel(q, k, v, q_seg)


def _mesh_specs(q, k):
  """shard_map specs (q/k/v, segment ids) over the batch and head mesh axes, or None off-mesh.

  An axis the local shape cannot be split over evenly is replicated instead; q and k/v heads
  are split together (or not at all) so each shard keeps whole query groups.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  batch_axes, _, head_axes = sharding.logical_to_spec(("batch", None, "act_kv_heads"))

  def divides(axes, *dims):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return all(n % math.prod(mesh.shape[a] for a in names) == 0 for n in dims)

  batch_axes = batch_axes if divides(batch_axes, q.shape[0]) else None
  head_axes = head_axes if divides(head_axes, q.shape[2], k.shape[2]) else None
  return P(batch_axes, None, head_axes, None), P(batch_axes, None)


def _fused(local_fn, q, k, v, seg):
  """Pad the sequence to the kernel tile, run ``local_fn`` per shard, cut the padding off."""
  t = q.shape[1]
  pad = -t % _BLOCK
  if pad:
    # Padding slots come last, so causality hides them from every real query; segment 0 gives
    # each padded query at least itself to attend to (no empty softmax row).
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)))
  specs = _mesh_specs(q, k)
  if specs is None:
    out = local_fn(q, k, v, seg)
  else:
    qkv_spec, seg_spec = specs
    out = jax.shard_map(
      local_fn,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
      out_specs=qkv_spec,
      check_vma=False,
    )(q, k, v, seg)
  return out[:, :t]


def _block(t: int) -> int:
  """The largest of 512, 256, 128 dividing ``t`` (a multiple of 128)."""
  return next(b for b in (512, 256, _BLOCK) if t % b == 0)


def _splash_kernel(heads: int, seq: int, interpret: bool):
  # Built per trace, not cached: the kernel holds its block-sparsity tables as arrays, which a
  # cache would leak from one trace into the next.
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  blk = _block(seq)
  sizes = sa.BlockSizes(
    block_q=blk,
    block_kv=blk,
    block_kv_compute=blk,
    block_q_dkv=blk,
    block_kv_dkv=blk,
    block_kv_dkv_compute=blk,
    block_q_dq=blk,
    block_kv_dq=blk,
  )
  mask = sa.MultiHeadMask([sa.CausalMask((seq, seq))] * heads)
  return sa.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def splash_attention(q, k, v, seg, *, interpret: bool | None = None) -> jax.Array:
  """Causal, segment-masked GQA by the Pallas TPU splash kernel. q [B,T,H,D], k/v [B,T,K,D]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  if interpret is None:
    interpret = target_platform() != "tpu"
  scale = q.shape[-1] ** -0.5

  def local(q, k, v, seg):
    kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
    # The kernel takes [heads, seq, head_dim] per row and does not scale the scores itself.
    qs = (jnp.swapaxes(q, 1, 2).astype(jnp.float32) * scale).astype(q.dtype)
    ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=SegmentIds(s, s)))(
      qs, ks, vs, seg
    )
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)

  return _fused(local, q, k, v, seg)


def flash_gpu_attention(q, k, v, seg, *, interpret: bool | None = None) -> jax.Array:
  """Causal, segment-masked attention by the Pallas GPU flash kernel. q [B,T,H,D], k/v [B,T,K,D]."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  if interpret is None:
    interpret = target_platform() != "gpu"
  scale = q.shape[-1] ** -0.5

  def local(q, k, v, seg):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    return gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, interpret=interpret)

  return _fused(local, q, k, v, seg)
