"""The one place that computes log p(target | context), and mean hidden states, in batches.

Every scored quantity in ``eval`` is a ``Request``: a context (at least the BOS token) and a
target whose per-token log-probabilities are wanted. Perplexity windows, the real
continuation of a completion and each option of a multiple-choice question are all
requests. Requests are packed several to a row (segment ids keep them from attending to
each other, positions restart at 0 for each), rows are stacked into fixed-shape batches
[batch, max_len] so one compiled program serves the whole run, and batches are sharded
over the mesh's data axes.

The log-softmax is taken in float32 from the final hidden state, whatever the compute
dtype, so bfloat16 models do not lose the small probabilities that perplexity depends on.

Embeddings reuse the same packing: the mean of the final-normed hidden states over marked
positions of each packed sequence, computed on the device.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from tqdm import tqdm

from astrollama_jax import sharding
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig

MIN_ROW = 2048  # tokens: rows shorter than this pack few requests per step


@dataclasses.dataclass(frozen=True)
class Request:
  """Score ``target`` given ``context`` (token ids; the context starts with BOS)."""

  context: Sequence[int]
  target: Sequence[int]


@dataclasses.dataclass
class _Item:
  """One packed sequence: model inputs, next-token targets, and the positions to read out."""

  inputs: np.ndarray
  targets: np.ndarray
  start: int  # read positions start..len(inputs)-1


def _logprob_item(req: Request, i: int) -> _Item:
  if len(req.context) < 1:
    raise ValueError(f"request {i}: the context is empty (it must start with BOS)")
  if len(req.target) < 1:
    raise ValueError(f"request {i}: the target is empty")
  full = np.concatenate([np.asarray(req.context, np.int32), np.asarray(req.target, np.int32)])
  return _Item(full[:-1], full[1:], len(req.context) - 1)


def window_requests(ids: Sequence[int], max_len: int, stride: int) -> list[Request]:
  """Sliding-window requests that score every token of ``ids`` after the first exactly once.

  Window k feeds at most ``max_len`` input tokens starting at ``k * stride``; the first
  window scores all its predictions, each later one only the ``stride`` newest, so every
  token after the first window sees at least ``max_len - stride`` tokens of context. With
  ``len(ids) <= max_len + 1`` this is one request: context [BOS], target the rest.
  """
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
  n = len(ids)
  if n < 2:
    return []
  out, begin, scored_to = [], 0, 1
  while True:
    end = min(begin + max_len + 1, n)
    out.append(Request(list(ids[begin:scored_to]), list(ids[scored_to:end])))
    if end == n:
      return out
    scored_to = end
    begin += stride


def pack(lengths: Sequence[int], row_len: int, max_segments: int) -> list[list[int]]:
  """Best-fit-decreasing packing of sequences into rows of ``row_len`` tokens.

  Returns, for each row, the item indices it holds (in placement order). Deterministic.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (space left, row id), sorted; only rows with room
  for i in order:
    n = lengths[i]
    if n > row_len:
      raise ValueError(f"sequence {i} has {n} tokens, more than the row length {row_len}")
    j = bisect.bisect_left(free, (n, -1))
    if j < len(free):
      left, r = free.pop(j)
    else:
      left, r = row_len, len(rows)
      rows.append([])
    rows[r].append(i)
    left -= n
    if left > 0 and len(rows[r]) < max_segments:
      bisect.insort(free, (left, r))
  return rows


class Scorer:
  """Runs packed batches of requests through one model on one mesh.

  ``batch_size`` rows go through the model per step; it is rounded up to a multiple of the
  mesh's batch-parallel size. ``max_len`` is the context (no request may be longer); a row is as
  long as the longest request of a call needs (``row_length``), so a LLaMA 3.1 model's 131,072
  positions do not turn every batch of abstracts into rows of 131,072 tokens. Call ``logprobs``
  or ``embeddings``.
  """

  def __init__(
    self,
    cfg: LlamaConfig,
    params: Any,
    mesh: Mesh | None = None,
    batch_size: int = 8,
    max_len: int | None = None,
    max_segments: int = 64,
    progress: bool = True,
  ):
    self.cfg, self.params, self.mesh = cfg, params, mesh
    self.max_len = int(max_len or cfg.max_seq_len)
    if self.max_len > cfg.max_seq_len:
      raise ValueError(f"max_len {self.max_len} exceeds the model's context {cfg.max_seq_len}")
    ways = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-max(1, batch_size) // ways) * ways
    self.max_segments = max_segments
    self.progress = progress
    # Build (and cache) the abstract module now: NNX's eval_shape fails when it first runs
    # inside ``jax.set_mesh`` with logical axis names as shardings.
    llama.param_shapes(cfg)
    self._logprob_fn = jax.jit(functools.partial(_logprob_step, cfg))
    self._mean_fn = jax.jit(functools.partial(_mean_hidden_step, cfg, max_segments))

  # --- public --------------------------------------------------------------------------------

  def logprobs(
    self,
    requests: Sequence[Request],
    candidates: Sequence[int] | None = None,
    desc: str = "scoring",
  ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per-token log p of each request's target (float64 arrays, one per request).

    With ``candidates`` (a few token ids, e.g. answer letters), also returns for each request
    the log-probs of every candidate at each target position ([len(target), C]).
    """
    items = [_logprob_item(r, i) for i, r in enumerate(requests)]
    cand = jnp.asarray(list(candidates), jnp.int32) if candidates else None
    lp_out = [None] * len(items)
    cand_out = [None] * len(items) if candidates else None

    def collect(rows_items, arrays):
      lp, cp = arrays
      for r, placed in enumerate(rows_items):
        for idx, off in placed:
          it = items[idx]
          sl = slice(off + it.start, off + len(it.inputs))
          lp_out[idx] = lp[r, sl].astype(np.float64)
          if cand_out is not None:
            cand_out[idx] = cp[r, sl].astype(np.float64)

    self._run(items, lambda b: self._logprob_fn(self.params, *b, cand), collect, desc)
    return lp_out, cand_out

  def embeddings(
    self, token_lists: Sequence[Sequence[int]], skip_first: int = 1, desc: str = "embedding"
  ) -> np.ndarray:
    """Mean final-normed hidden state over each sequence's tokens after the first ``skip_first``.

    AstroLLaMA's embedding: the average of the last layer's hidden states over the tokens
    after BOS. Returns [N, dim] float32.
    """
    items = []
    for i, ids in enumerate(token_lists):
      ids = np.asarray(ids, np.int32)
      if len(ids) <= skip_first:
        raise ValueError(
          f"sequence {i} has {len(ids)} tokens; nothing after the first {skip_first} to average"
        )
      items.append(_Item(ids, np.zeros_like(ids), skip_first))
    out = np.zeros((len(items), self.cfg.dim), np.float32)

    def collect(rows_items, means):
      for r, placed in enumerate(rows_items):
        for s, (idx, _) in enumerate(placed):
          out[idx] = means[r, s]

    self._run(items, lambda b: self._mean_fn(self.params, *b), collect, desc)
    return out

  # --- internals -----------------------------------------------------------------------------

  def row_length(self, longest: int) -> int:
    """The row length for requests of at most ``longest`` tokens: the next power of two, at
    least ``MIN_ROW`` (a few compiled shapes, rows long enough to pack), at most ``max_len``."""
    return min(self.max_len, max(MIN_ROW, 1 << max(0, longest - 1).bit_length()))

  def _run(self, items: list[_Item], step, collect, desc: str) -> None:
    if not items:
      return
    self._row = self.row_length(max(len(it.inputs) for it in items))
    rows = pack([len(it.inputs) for it in items], self._row, self.max_segments)
    batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
    pending = None
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      for batch_rows in tqdm(
        batches, desc=desc, unit="batch", disable=not self.progress, leave=False
      ):
        arrays, placed = self._assemble(items, batch_rows)
        result = step(tuple(self._put(a) for a in arrays))  # dispatched asynchronously
        if pending is not None:
          collect(pending[0], self._fetch(pending[1]))
        pending = (placed, result)
      collect(pending[0], self._fetch(pending[1]))

  def _assemble(self, items, batch_rows):
    b, n = self.batch_size, self._row
    tokens = np.zeros((b, n), np.int32)
    targets = np.zeros((b, n), np.int32)
    segs = np.zeros((b, n), np.int32)
    pos = np.zeros((b, n), np.int32)
    mask = np.zeros((b, n), np.float32)
    placed = []
    for r, row in enumerate(batch_rows):
      off, row_placed = 0, []
      for s, idx in enumerate(row):
        it = items[idx]
        m = len(it.inputs)
        tokens[r, off : off + m] = it.inputs
        targets[r, off : off + m] = it.targets
        segs[r, off : off + m] = s + 1
        pos[r, off : off + m] = np.arange(m)
        mask[r, off + it.start : off + m] = 1.0
        row_placed.append((idx, off))
        off += m
      placed.append(row_placed)
    return (tokens, targets, segs, pos, mask), placed

  def _put(self, a: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(a)
    shard = sharding.batch_sharding(self.mesh, a.ndim)
    return jax.make_array_from_callback(a.shape, shard, lambda idx: a[idx])

  def _fetch(self, tree):
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def _logprob_step(
  cfg: LlamaConfig, params, tokens, targets, segment_ids, positions, mask, candidates=None
):
  """log p(targets) per position ([B, T], 0 where mask is 0), and candidates' log p [B, T, C].

  Picking logits by one-hot products (not gathers) keeps the vocabulary axis sharded: the
  reduction over it becomes one small all-reduce instead of replicating [B, T, V] logits.
  """
  h, _ = llama.apply(cfg, params, tokens, positions, segment_ids, return_hidden=True)
  logits = jnp.einsum(
    "btd,dv->btv", h, llama.head_weight(params).astype(h.dtype), preferred_element_type=jnp.float32
  )
  logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.sum(logits * jax.nn.one_hot(targets, cfg.vocab_size, dtype=logits.dtype), -1)
  tgt = (picked - lse) * mask
  if candidates is None:
    return tgt, None
  cand_onehot = jax.nn.one_hot(candidates, cfg.vocab_size, dtype=logits.dtype)  # [C, V]
  cand = jnp.einsum("btv,cv->btc", logits, cand_onehot) - lse[..., None]
  return tgt, cand * mask[..., None]


def _mean_hidden_step(
  cfg: LlamaConfig, max_segments: int, params, tokens, targets, segment_ids, positions, mask
):
  """Per packed segment, the mean final hidden state over masked positions: [B, S, D]."""
  del targets
  h, _ = llama.apply(cfg, params, tokens, positions, segment_ids, return_hidden=True)
  onehot = jax.nn.one_hot(segment_ids - 1, max_segments, dtype=jnp.float32) * mask[..., None]
  sums = jnp.einsum("bts,btd->bsd", onehot, h.astype(jnp.float32))
  counts = onehot.sum(axis=1)[..., None]
  return sums / jnp.maximum(counts, 1.0)
