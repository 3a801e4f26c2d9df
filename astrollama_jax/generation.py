"""Batched text generation with the KV cache: one prefill call, then a compiled decode loop.

Why this shape:

* Prompts of different lengths are **left-padded** into one batch (segment id 0 marks padding,
  positions restart at 0 on each row's first real token), so every row's next token lands in the
  same cache slot and one scalar cache index serves the whole batch.
* The decode loop is a ``jax.lax.while_loop`` inside one jit that stops as soon as every row is
  done. It runs "until step n", with n a traced argument, so the same executable serves a
  single call for the whole answer and the chunked calls used for streaming and stop strings.
* Prompt length, answer length and batch size are **bucketed** (powers of two, see ``bucket``)
  so that recompiles are rare; the extra left padding is masked away.
* Randomness is ``fold_in(key(seed), step)``: a given seed gives the same tokens whether the loop
  ran in one call or in chunks.

``python -m astrollama_jax generate`` (``commands/generate.py``) is the one-shot command line
around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from astrollama_jax import sharding
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig

Params = dict[str, Any]
StreamFn = Callable[[list[list[int]]], Any]

_STATE_LOGICAL = {
  "token": ("batch",),
  "pos": ("batch",),
  "done": ("batch",),
  "out": ("batch", None),
}


@dataclasses.dataclass
class GenerationResult:
  """Generated ids per prompt (EOS and stop strings excluded) and, with a tokenizer, their text."""

  tokens: list[list[int]]
  texts: list[str] | None = None
  finish_reasons: list[str] = dataclasses.field(default_factory=list)  # "eos" | "stop" | "length"
  prompt_lengths: list[int] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def num_generated(self) -> int:
    return sum(len(t) for t in self.tokens)


def bucket(n: int, minimum: int = 16) -> int:
  """Round a length up to a power of two, at least ``minimum``.

  Powers of two, not multiples of 64: a chat's prompt grows every turn, and with doubling buckets
  a 4096-token context recompiles 6 times in its life instead of once per ~64 tokens of history.
  The padding costs one bigger prefill call and a longer (masked) cache, cheap next to the weights
  that every decode step reads.
  """
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _batch_bucket(n: int, shards: int) -> int:
  b = 1 << max(0, n - 1).bit_length()
  return -(-b // shards) * shards


# --- sampling ------------------------------------------------------------------------------------


def sample_logits(
  logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """Sample one id per row of [B, V] logits: temperature, then top-k, then nucleus (top-p).

  All three knobs are traced values, so changing them never recompiles. ``top_k <= 0`` and
  ``top_p >= 1`` switch the filters off; the most likely token always survives both.
  """
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  v = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  rank = jnp.arange(v)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  in_top_k = rank < k
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _next_token(logits, key, step, knobs, sample: bool):
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_logits(
    logits, jax.random.fold_in(key, step), knobs["temperature"], knobs["top_k"], knobs["top_p"]
  )


def _constrain_cache(cache: dict[str, Any]) -> dict[str, Any]:
  return {
    k: sharding.constrain(v, llama.CACHE_LOGICAL[k]) if k != "index" else v
    for k, v in cache.items()
  }


def _constrain_state(state: dict[str, Any]) -> dict[str, Any]:
  """Pin every batch-shaped array to the batch sharding, so prefill and decode outputs agree."""
  state = dict(state)
  state["cache"] = _constrain_cache(state["cache"])
  for k, logical in _STATE_LOGICAL.items():
    state[k] = sharding.constrain(state[k], logical)
  return state


# --- the two compiled pieces ---------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "out_len", "sample"))
def _prefill(
  params,
  tokens,
  mask,
  active,
  key,
  knobs,
  *,
  cfg: LlamaConfig,
  cache_len: int,
  out_len: int,
  sample: bool,
):
  """Run the padded prompts through the model once and sample the first new token."""
  b = tokens.shape[0]
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = _constrain_cache(llama.init_cache(cfg, b, cache_len))
  hidden, cache = llama.apply(cfg, params, tokens, positions, mask, cache, return_hidden=True)
  # The head on the last column only: [B, T, V] logits of a long prompt would not fit in memory.
  last = hidden[:, -1]
  logits = jnp.einsum("bd,dv->bv", last, llama.head_weight(params).astype(last.dtype))
  first = _next_token(logits, key, 0, knobs, sample)
  first = jnp.where(active, first, 0)
  out = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first)
  done = ~active | _is_stop(first, knobs) | (knobs["max_new"] <= 1)
  state = {
    "cache": cache,
    "token": first,
    "pos": positions[:, -1] + 1,
    "done": done,
    "out": out,
    "step": jnp.ones((), jnp.int32),
    "key": key,
  }
  return _constrain_state(state)


@functools.partial(jax.jit, static_argnames=("cfg", "sample"), donate_argnames=("state",))
def _decode(params, state, until, stopped, knobs, *, cfg: LlamaConfig, sample: bool):
  """Generate tokens for steps ``state['step']`` .. ``until - 1``, or until every row is done.

  ``stopped`` marks rows the host ended (stop strings); passing it in, rather than editing
  ``state`` on the host, keeps the argument shardings and so the compiled program unchanged.
  """
  state = {**state, "done": state["done"] | stopped}

  def cond(s):
    return (s["step"] < until) & ~jnp.all(s["done"])

  def body(s):
    seg = jnp.ones_like(s["token"])[:, None]
    logits, cache = llama.apply(
      cfg, params, s["token"][:, None], s["pos"][:, None], seg, s["cache"]
    )
    tok = _next_token(logits[:, -1], s["key"], s["step"], knobs, sample)
    tok = jnp.where(s["done"], 0, tok)
    out = jax.lax.dynamic_update_slice_in_dim(s["out"], tok[:, None], s["step"], axis=1)
    done = s["done"] | _is_stop(tok, knobs) | (s["step"] + 1 >= knobs["max_new"])
    new = {
      "cache": cache,
      "token": tok,
      "pos": s["pos"] + 1,
      "done": done,
      "out": out,
      "step": s["step"] + 1,
      "key": s["key"],
    }
    return _constrain_state(new)

  return jax.lax.while_loop(cond, body, state)


# --- host side ------------------------------------------------------------------------------------


def _put(x: np.ndarray, where: jax.sharding.Sharding) -> jax.Array:
  """Host array -> global array; every process passes the same ``x`` (works across hosts)."""
  return jax.make_array_from_callback(x.shape, where, lambda idx: x[idx])


def _fetch(x: jax.Array) -> np.ndarray:
  """Global array -> host numpy on every process (gathers across hosts when there are several)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _find_stop(text: str, stop_strings: Sequence[str]) -> int:
  """Index of the earliest stop string in ``text``, or -1."""
  hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
  return min(hits) if hits else -1


def _cut_at_stop(ids: list[int], text: str, cut: int, tokenizer: Tokenizer) -> list[int]:
  """The longest prefix of ``ids`` whose text ends at or before the stop string at ``cut``."""
  keep = text[:cut]
  for j in range(len(ids), -1, -1):
    t = tokenizer.decode(ids[:j])
    if len(t) <= cut and keep.startswith(t):
      return ids[:j]
  return []


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """Raise ``ValueError`` naming the first sampling setting out of range (NaN included)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not 0 <= temperature < float("inf"):
    raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


STOP_SLOTS = 8  # end ids a row can stop at; a fixed width keeps one compiled program


def _stop_slots(eos_id: int | Sequence[int]) -> np.ndarray:
  """The end ids padded with -1 (never a token) to ``STOP_SLOTS``."""
  ids = [int(eos_id)] if np.ndim(eos_id) == 0 else [int(i) for i in eos_id]
  if len(ids) > STOP_SLOTS:
    raise ValueError(f"generate: at most {STOP_SLOTS} end ids, got {len(ids)}")
  return np.asarray(ids + [-1] * (STOP_SLOTS - len(ids)), np.int32)


def _is_stop(tok: jax.Array, knobs: dict) -> jax.Array:
  return jnp.any(tok[:, None] == knobs["eos_id"][None, :], axis=1)


def _validate(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer):
  if not prompts:
    raise ValueError("generate: no prompts given")
  check_sampling(max_new_tokens, temperature, top_k, top_p)
  if stop_strings and tokenizer is None:
    raise ValueError("stop_strings need a tokenizer to decode the generated text")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty (it needs at least a BOS token)")
    bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise ValueError(
        f"prompt {i} has ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}"
      )
    if len(p) + max_new_tokens > cfg.max_seq_len:
      raise ValueError(
        f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
        f"exceeds the model's max_seq_len {cfg.max_seq_len}"
      )


def generate(
  cfg: LlamaConfig,
  params: Params,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int | Sequence[int] = 2,
  stop_strings: Sequence[str] | None = None,
  tokenizer: Tokenizer | None = None,
  mesh: Mesh | None = None,
  stream: StreamFn | None = None,
  chunk_size: int | None = None,
) -> GenerationResult:
  """Continue each prompt (a list of ids, BOS included) by up to ``max_new_tokens`` tokens.

  Greedy when ``temperature == 0``; else samples with temperature, ``top_k`` (0 = off) and
  ``top_p`` (1 = off), seeded by ``seed``. A row stops at ``eos_id`` (one id or several: a
  family's end ids, at most 8) or at the first of
  ``stop_strings`` in its decoded text (checked on the host between chunks of ``chunk_size``
  steps; both are excluded from the result: the text ends where the stop string begins, the ids
  are the longest prefix whose text does not reach into it). ``stream`` is called after every
  chunk with the new ids of each row (a list per prompt, empty for finished rows); ids that
  begin a stop string may be streamed before the string is complete. On a ``mesh`` the params
  are placed by the sharding rules (a no-op if they already are) and the batch is split over
  the data axes.
  """
  start_time = time.perf_counter()
  stop_strings = [s for s in (stop_strings or []) if s]
  _validate(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_strings, tokenizer)
  n = len(prompts)
  lengths = [len(p) for p in prompts]
  shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  b, t, out_len = _batch_bucket(n, shards), bucket(max(lengths), 64), bucket(max_new_tokens)
  tokens = np.zeros((b, t), np.int32)
  mask = np.zeros((b, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p) :] = np.asarray(p, np.int32)
    mask[i, t - len(p) :] = 1
  active = np.arange(b) < n
  stop_ids = _stop_slots(eos_id)
  knobs = {
    "temperature": np.float32(temperature),
    "top_k": np.int32(top_k),
    "top_p": np.float32(top_p),
    "eos_id": stop_ids,
    "max_new": np.int32(max_new_tokens),
  }
  sample = temperature > 0
  if chunk_size is None:
    chunk_size = 8 if (stream is not None or stop_strings) else max_new_tokens
  chunk_size = max(1, int(chunk_size))

  if mesh is not None:
    params = llama.shard_params(cfg, params, mesh)
    batch = sharding.batch_sharding(mesh)
    row = NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
    tokens, mask, active = _put(tokens, batch), _put(mask, batch), _put(active, row)
    knobs = {k: _put(np.asarray(v), NamedSharding(mesh, P())) for k, v in knobs.items()}
  else:
    params = jax.tree.map(jnp.asarray, params)

  rows = _Rows(n, b, stop_ids, max_new_tokens, stop_strings, tokenizer)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    state = _prefill(
      params,
      tokens,
      mask,
      active,
      jax.random.key(seed),
      knobs,
      cfg=cfg,
      cache_len=t + out_len,
      out_len=out_len,
      sample=sample,
    )
    while True:
      step = int(state["step"])
      # The whole buffer comes back: slicing on device would compile a program per slice shape.
      streamed = rows.take(_fetch(state["out"]), _fetch(state["done"]), step)
      if stream is not None and any(streamed):
        stream(streamed)
      if all(rows.finished):
        break
      until = np.int32(min(step + chunk_size, max_new_tokens))
      stopped = _put(rows.stopped, row) if mesh is not None else jnp.asarray(rows.stopped)
      state = _decode(params, state, until, stopped, knobs, cfg=cfg, sample=sample)

  texts = None
  if tokenizer is not None:
    texts = [rows.cut_texts.get(i, tokenizer.decode(ids)) for i, ids in enumerate(rows.ids)]
  return GenerationResult(rows.ids, texts, rows.reasons, lengths, time.perf_counter() - start_time)


class _Rows:
  """Host-side bookkeeping of the generated ids: EOS, stop strings, what is new for the stream."""

  def __init__(
    self,
    n: int,
    padded: int,
    eos_ids: np.ndarray,
    max_new: int,
    stop_strings: Sequence[str],
    tokenizer: Tokenizer | None,
  ):
    self.eos_ids, self.max_new, self.stop_strings, self.tokenizer = (
      {int(i) for i in eos_ids},
      max_new,
      stop_strings,
      tokenizer,
    )
    self.ids: list[list[int]] = [[] for _ in range(n)]
    self.reasons = ["length"] * n
    self.finished = [False] * n
    self.stopped = np.zeros(padded, bool)  # rows ended by a stop string, sent back to the device
    self.cut_texts: dict[int, str] = {}  # their text, cut exactly where the stop string begins
    self.seen = 0  # steps already taken from the device buffer

  def take(self, out: np.ndarray, done: np.ndarray, step: int) -> list[list[int]]:
    """Absorb steps ``seen .. step-1`` of the device's ``out`` buffer; return each row's new ids."""
    new = out[:, self.seen : step]
    self.seen = step
    streamed: list[list[int]] = [[] for _ in self.ids]
    for i, ids in enumerate(self.ids):
      if self.finished[i]:
        continue
      for tok in new[i].tolist():
        if tok in self.eos_ids:
          self.finished[i], self.reasons[i] = True, "eos"
          break
        ids.append(tok)
        streamed[i].append(tok)
      if self.stop_strings and not self.finished[i]:
        text = self.tokenizer.decode(ids)
        cut = _find_stop(text, self.stop_strings)
        if cut >= 0:
          self.ids[i] = _cut_at_stop(ids, text, cut, self.tokenizer)
          self.cut_texts[i] = text[:cut]
          self.finished[i], self.reasons[i] = True, "stop"
          self.stopped[i] = True
      if done[i] or step >= self.max_new:
        self.finished[i] = True
    return streamed


class TextStream:
  """Turns per-chunk generated ids into printable text deltas: text that can still change (an
  incomplete character, the start of a stop string) is held back until it cannot."""

  def __init__(
    self, tokenizer: Tokenizer, emit: Callable[[str], None] | None, stop_strings: Sequence[str] = ()
  ):
    self.tokenizer, self.emit, self.stop_strings = tokenizer, emit, [s for s in stop_strings if s]
    self.ids: list[int] = []
    self.printed = ""

  def _safe(self, text: str) -> str:
    """The part of ``text`` that can no longer change or turn out to be a stop string."""
    for s in self.stop_strings:
      if s in text:
        text = text[: text.index(s)]
    hold = 0
    for s in self.stop_strings:
      for n in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:n]):
          hold = max(hold, n)
          break
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd")  # an incomplete multi-byte character

  def _write(self, text: str) -> None:
    if text.startswith(self.printed) and len(text) > len(self.printed):
      if self.emit is not None:
        self.emit(text[len(self.printed) :])
      self.printed = text

  def update(self, new_ids: list[list[int]]) -> None:
    """``generate``'s stream callback (batch of one)."""
    self.ids += new_ids[0]
    self._write(self._safe(self.tokenizer.decode(self.ids)))

  def finish(self, final_text: str) -> None:
    self._write(final_text)
