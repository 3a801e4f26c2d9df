"""Where batches come from: the one place that dispatches on ``config.data.kind``.

* ``lm``: the packed astro-ph corpus (``astrollama_jax.data.pipeline``, from ``prepare``);
* ``sft``: packed, loss-masked chat conversations (``astrollama_jax.data.chat``);
* ``synthetic``: deterministic packed rows of simple token sequences, for throughput runs and
  for tests that must not depend on a corpus. Row ``r`` of the global stream is a function of
  (seed, r) only, and process ``p`` reads the rows its devices hold, so any host layout sees
  the same global batches.

Every kind reads ``config.data`` (shared keys) and its own sub-section ``config.data.<kind>``,
and yields per-process numpy batches (``packing.BATCH_SPEC``: tokens, targets, segment_ids,
positions int32, loss_mask float32) of shape [global_batch / processes, seq_len] from an
iterator with
``get_state()``/``set_state()``; ``to_global`` assembles them into sharded ``jax.Array``s.
"""

from __future__ import annotations

from collections.abc import Iterator
import hashlib
import os
import time
from typing import Any

import grain
import jax
from jax.sharding import Mesh
import numpy as np

from astrollama_jax.data.packing import BATCH_KEYS, as_batch
from astrollama_jax.train.defaults import DATA_KINDS
from astrollama_jax.train.step import batch_shardings


def local_batch_size(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
  return global_batch // n


def make_dataset(
  config: Any,
  split: str,
  *,
  batch_size: int | None = None,
  num_epochs: int | None = None,
  shuffle: bool | None = None,
) -> grain.IterDataset:
  """This process's batches of ``split`` ('train' or 'validation') for ``config.data``.

  ``batch_size`` is the global batch (default ``config.train.global_batch_size``);
  ``num_epochs=None`` repeats forever.
  """
  d = config.data
  if d.kind not in DATA_KINDS:
    raise ValueError(f"config.data.kind {d.kind!r} is not one of {DATA_KINDS}")
  global_batch = batch_size or config.train.global_batch_size
  local = local_batch_size(global_batch)
  shuffle = d.shuffle if shuffle is None else shuffle
  common = dict(
    seq_len=d.seq_len,
    batch_size=local,
    seed=d.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_epochs=num_epochs,
    shuffle=shuffle,
  )
  if d.kind == "lm":
    from astrollama_jax.data import pipeline

    mixture = dict(d.lm.mixture)
    if any(not key.isidentifier() for key in mixture):  # date bounds: "since:2024-06 abstract"
      return make_components_dataset(
        d.lm.path, split, d.tokenizer_path, mixture, worker_count=d.lm.worker_count, **common
      )
    return pipeline.make_lm_dataset(
      d.lm.path,
      split=split,
      tokenizer_path=d.tokenizer_path,
      mixture=mixture or None,
      worker_count=d.lm.worker_count,
      **common,
    )
  if d.kind == "sft":
    from astrollama_jax.data import chat

    sources = d.sft.sources if split == "train" else d.sft.eval_sources
    if not sources:
      raise ValueError("config.data.sft.eval_sources is empty: no SFT validation data")
    return chat.make_sft_dataset(list(sources), d.tokenizer_path, **common)
  return synthetic_dataset(
    d.seq_len,
    global_batch,
    seed=d.seed + (split != "train"),
    num_rows=d.synthetic.num_rows,
    num_epochs=num_epochs,
    stall_after=d.synthetic.stall_after_steps if split == "train" else 0,
  )


# Keys of ``config.data`` that do not change which records a training step reads.
_NOT_IDENTITY = ("tokenizer_path", "lm.worker_count", "sft.eval_sources")


def run_identity(config: Any) -> dict[str, Any]:
  """What a resumed run must share with the one that saved: the data source, order and batch.

  The shared ``data.*`` keys and those of the active kind's section (``data.lm.path`` made
  absolute), plus the global batch size. The checkpoint keeps them; a restore that finds
  another value stops, naming the key.
  """
  d = config.data.to_dict()
  out: dict[str, Any] = {"train.global_batch_size": int(config.train.global_batch_size)}
  items = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
  items += [(f"{d['kind']}.{k}", v) for k, v in d.get(d["kind"], {}).items()]
  for name, value in items:
    if name not in _NOT_IDENTITY:
      out[f"data.{name}"] = os.path.abspath(value) if name == "lm.path" and value else value
  return out


def has_split(config: Any, split: str) -> bool:
  """Whether ``split`` can be read (SFT validation needs ``data.sft.eval_sources``)."""
  if config.data.kind == "sft" and split != "train":
    return bool(config.data.sft.eval_sources)
  return True


# --- mixtures of record sets (sections, date ranges) ----------------------------------------------


def make_components_dataset(
  data_dir: str,
  split: str,
  tokenizer_path: str,
  components: Any,
  *,
  seq_len: int,
  batch_size: int,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  num_epochs: int | None = None,
  shuffle: bool = True,
  worker_count: int = 0,
  drop_remainder: bool = True,
) -> grain.IterDataset:
  """Packed LM batches that mix record sets by weight, each named as
  ``corpus.component_indices`` reads it: ``{"since:2024-06-01": 0.7, "abstract": 0.3}`` trains
  on "everything since June 2024" for 70% of the documents. Batches as ``make_lm_dataset``'s."""
  from astrollama_jax.data import corpus, packing, pipeline
  from astrollama_jax.data.tokenizer import Tokenizer

  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  source = corpus.TextSource(data_dir, split)
  tokenize = pipeline._Tokenize(Tokenizer(tokenizer_path))
  parts, weights = [], []
  for salt, (spec, weight) in enumerate(sorted(dict(components).items()), 1):
    if weight <= 0:
      continue
    mine = corpus.component_indices(data_dir, split, spec)[pi::pc]
    if not len(mine):
      raise ValueError(
        f"mixture component {spec!r} has no records of split {split!r} for "
        f"process {pi} of {pc} under {data_dir}"
      )
    subset = pipeline._Subset(source, mine)
    order = pipeline._EpochShuffled(subset, seed * 1000003 + 97 * salt, num_epochs, shuffle)
    parts.append(grain.MapDataset.source(order).map(tokenize))
    weights.append(float(weight))
  if not parts:
    raise ValueError(f"mixture {dict(components)} has no positive weight")
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  rows = packing.pack_examples(ds.to_iter_dataset(packing.read_options(worker_count)), seq_len)
  it = rows.batch(batch_size, drop_remainder=drop_remainder)
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


# --- synthetic data ------------------------------------------------------------------------------


def synthetic_row(seed: int, row: int, seq_len: int, vocab: int = 1000) -> dict[str, np.ndarray]:
  """One packed row: 1-3 arithmetic token progressions (learnable), then maybe some padding."""
  rng = np.random.default_rng([seed, row])
  tokens = np.zeros(seq_len + 1, np.int32)
  segs = np.zeros(seq_len + 1, np.int32)
  pos = np.zeros(seq_len + 1, np.int32)
  fill = seq_len + 1 - int(rng.integers(0, seq_len // 4 + 1))
  cuts = (
    np.sort(
      rng.choice(np.arange(2, fill - 1), size=min(int(rng.integers(0, 3)), fill - 3), replace=False)
    )
    if fill > 4
    else np.array([], np.int64)
  )
  bounds = [0, *cuts.tolist(), fill]
  for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    start, stride = int(rng.integers(3, vocab)), int(rng.integers(1, 8))
    tokens[a:b] = 3 + (start + stride * np.arange(b - a)) % (vocab - 3)
    tokens[a] = 1  # BOS
    segs[a:b] = s + 1
    pos[a:b] = np.arange(b - a)
  same_doc = (segs[:-1] == segs[1:]) & (segs[:-1] != 0)
  return as_batch(
    {
      "tokens": tokens[:-1],
      "targets": np.where(same_doc, tokens[1:], 0),
      "segment_ids": segs[:-1],
      "positions": pos[:-1],
      "loss_mask": same_doc,
    }
  )


class _SyntheticRows:
  """Picklable map: this process's i-th row -> global row -> its content."""

  def __init__(self, seed: int, seq_len: int, global_batch: int, local: int, offset: int):
    self.seed, self.seq_len, self.global_batch, self.local, self.offset = (
      seed,
      seq_len,
      global_batch,
      local,
      offset,
    )

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    row = (i // self.local) * self.global_batch + self.offset + i % self.local
    return synthetic_row(self.seed, row, self.seq_len)


class _StallAfter:
  """Batch ``i`` as is for ``i < n``, then never returns: a data source that hangs mid-run."""

  def __init__(self, n: int):
    self.n = n

  def __call__(self, index: int, batch: Any) -> Any:
    while index >= self.n:
      time.sleep(1.0)
    return batch


def synthetic_dataset(
  seq_len: int,
  global_batch: int,
  *,
  seed: int = 0,
  num_rows: int = 4096,
  num_epochs: int | None = None,
  stall_after: int = 0,
) -> grain.IterDataset:
  """``num_rows`` synthetic rows per epoch, batched; this process gets rows of its devices.

  ``stall_after`` > 0 makes batch ``stall_after`` (0-based, over all epochs) block forever, to
  exercise the hang watchdog on a stuck input pipeline.
  """
  local = local_batch_size(global_batch)
  steps = num_rows // global_batch
  if steps < 1:
    raise ValueError(f"num_rows {num_rows} is less than one global batch of {global_batch}")
  offset = jax.process_index() * local  # devices are ordered process-major (checked in to_global)
  ds = grain.MapDataset.range(steps * local).map(
    _SyntheticRows(seed, seq_len, global_batch, local, offset)
  )
  ds = ds.repeat(num_epochs) if num_epochs != 1 else ds
  ds = ds.batch(local, drop_remainder=True)
  if stall_after > 0:
    ds = ds.map_with_index(_StallAfter(stall_after))
  return ds.to_iter_dataset()


# --- host batches -> global arrays ---------------------------------------------------------------


def to_global(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assemble every process's rows into global [global_batch, seq] arrays on ``mesh``.

  Process ``p`` supplies rows ``[p * local, (p + 1) * local)`` of the global batch.
  """
  shardings = batch_shardings(mesh)
  missing = [k for k in BATCH_KEYS if k not in local]
  if missing:
    raise KeyError(f"batch lacks {missing}; have {sorted(local)}")
  out = {}
  for k in BATCH_KEYS:
    x = np.asarray(local[k])
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    if k == "tokens" and jax.process_count() > 1:
      _check_process_rows(shardings[k], global_shape, x.shape[0])
    out[k] = jax.make_array_from_process_local_data(shardings[k], x, global_shape)
  return out


def _check_process_rows(sharding, global_shape, local_rows: int) -> None:
  """This process's devices must hold one contiguous block of rows, the p-th one."""
  rows = sorted(
    {
      (idx[0].start or 0, idx[0].stop or global_shape[0])
      for idx in sharding.addressable_devices_indices_map(global_shape).values()
    }
  )
  start, stop = rows[0][0], rows[-1][1]
  want = jax.process_index() * local_rows
  if (start, stop) != (want, want + local_rows):
    raise ValueError(
      f"process {jax.process_index()} holds batch rows [{start}, {stop}) but feeds "
      f"rows [{want}, {want + local_rows}): the mesh is not ordered process-major"
    )


def batch_hash(local: dict[str, np.ndarray]) -> str:
  """A short digest of a host batch, logged per step to prove which data a step consumed."""
  h = hashlib.blake2b(digest_size=8)
  for k in BATCH_KEYS:
    h.update(np.ascontiguousarray(local[k]).tobytes())
  return h.hexdigest()


def count_batches(it: Iterator[Any], limit: int | None = None) -> int:
  """Exhaust an iterator (one epoch), counting its batches."""
  n = 0
  for _ in it:
    n += 1
    if limit is not None and n >= limit:
      break
  return n
