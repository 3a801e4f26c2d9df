"""Where batches come from: ``DATA_KINDS``, one entry per ``config.data.kind``.

A kind's entry (``DataKind``) says how it reads a split and what a run of it needs; nothing else
in the trainer asks which kind it runs. A kind of tokenized records supplies its records and
their tokenize/render step and shares the rest (``data/batches.py``: shards, packing, batches).

* ``lm``: the packed astro-ph corpus (``astrollama_jax.data.pipeline``, from ``prepare``);
* ``sft``: packed, loss-masked chat conversations (``astrollama_jax.data.chat_dataset``);
* ``synthetic``: deterministic packed rows of simple token sequences, for throughput runs and
  for tests that must not depend on a corpus. Row ``r`` of the global stream is a function of
  (seed, r) only, and process ``p`` reads the rows its devices hold, so any host layout sees
  the same global batches.

Every kind reads ``config.data`` (shared keys) and its own sub-section ``config.data.<kind>``,
and yields per-process numpy batches (``packing.BATCH_SPEC``: tokens, targets, segment_ids,
positions int32, loss_mask float32) of shape [global_batch / processes, seq_len] from an
iterator with ``get_state()``/``set_state()``; ``to_global`` assembles them into sharded
``jax.Array``s. Tokenized kinds' training data is split into ``config.data.shards`` virtual shards
(``data/shards.py``; 0: one per row of the global batch), fixed for the run: process ``p`` of
``P`` reads shards ``[p S/P, (p+1) S/P)`` and feeds their batches in shard order, so the global
batch of every step, and the data position a checkpoint keeps per shard, are the same for any
process count that divides ``S``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import hashlib
import os
import time
from typing import Any

import grain
import jax
from jax.sharding import Mesh
import numpy as np

from astrollama_jax.data.packing import BATCH_KEYS, BATCH_SPEC, as_batch
from astrollama_jax.train.step import batch_shardings


def local_batch_size(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
  return global_batch // n


def data_shards(config: Any, batch_size: int | None = None) -> int:
  """The run's number of data shards (``config.data.shards``; 0: one per row of the batch)."""
  return int(config.data.shards) or int(batch_size or config.train.global_batch_size)


@dataclasses.dataclass(frozen=True)
class Read:
  """One ``make_dataset`` call, resolved: what a kind's reader gets besides ``config.data``."""

  split: str
  global_batch: int
  batch_size: int  # this process's rows of the global batch
  shards: int
  num_epochs: int | None
  shuffle: bool
  drop_remainder: bool

  def layout(self, d: Any) -> dict[str, Any]:
    """The keyword arguments every tokenized kind's dataset takes (``batches.packed_batches``)."""
    return dict(
      seq_len=d.seq_len,
      batch_size=self.batch_size,
      seed=d.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      shards=self.shards,
      num_epochs=self.num_epochs,
      shuffle=self.shuffle,
      drop_remainder=self.drop_remainder,
    )


@dataclasses.dataclass(frozen=True)
class DataKind:
  """What ``config.data.kind`` reads, and what a run of it needs: one entry of ``DATA_KINDS``.

  ``read(config.data, Read) -> grain.IterDataset`` of this process's batches
  (``packing.BATCH_SPEC``, [global batch / processes, seq_len]) from an iterator with
  ``get_state()``/``set_state()``. ``needs``: (key of ``config.data``, what to pass) a run
  cannot do without. ``tokenized``: reads text through ``data.tokenizer_path`` in
  ``data.shards`` virtual shards. ``not_identity``: keys of its section that do not change which
  records a step reads. ``has_split(config.data, split)``: whether a split can be read.
  ``batches_per_epoch(config)``: known without reading the data (else counted). ``check(config)``:
  what to refuse before the first step.
  """

  read: Callable[[Any, Read], grain.IterDataset]
  needs: tuple[tuple[str, str], ...] = ()
  tokenized: bool = True
  not_identity: tuple[str, ...] = ()
  has_split: Callable[[Any, str], bool] = lambda d, split: True
  batches_per_epoch: Callable[[Any], int] | None = None
  check: Callable[[Any], None] = lambda config: None


def _lm(d: Any, read: Read) -> grain.IterDataset:
  from astrollama_jax.data import pipeline

  return pipeline.make_lm_dataset(
    d.lm.path,
    split=read.split,
    tokenizer_path=d.tokenizer_path,
    mixture=dict(d.lm.mixture) or None,
    worker_count=d.lm.worker_count,
    **read.layout(d),
  )


def _check_lm_validation(config: Any) -> None:
  """Evaluation on a corpus that has no validation records: say so now, not after compiling."""
  e = config.eval
  if not (e.every > 0 or e.at_start or e.at_end):
    return
  from astrollama_jax.data.corpus import read as corpus

  try:
    sizes = corpus.split_sizes(config.data.lm.path)
  except FileNotFoundError:
    return  # the data reader names a missing corpus itself
  if not sizes.get("validation"):
    raise ValueError(
      f"evaluation is on (eval.every={e.every}, eval.at_start={e.at_start}, "
      f"eval.at_end={e.at_end}) but the corpus {config.data.lm.path} has no validation records "
      "(prepare it with --validation_fraction > 0, or turn evaluation off)"
    )


def _sft(d: Any, read: Read) -> grain.IterDataset:
  from astrollama_jax.data import chat_dataset, chat_templates

  sources = d.sft.sources if read.split == "train" else d.sft.eval_sources
  if not sources:
    raise ValueError("config.data.sft.eval_sources is empty: no SFT validation data")
  template = chat_templates.choose(d.sft.chat_template, tokenizer=d.tokenizer_path)
  return chat_dataset.make_sft_dataset(
    list(sources), d.tokenizer_path, chat_template=template, **read.layout(d)
  )


def _synthetic(d: Any, read: Read) -> grain.IterDataset:
  train = read.split == "train"
  return synthetic_dataset(
    d.seq_len,
    read.global_batch,
    seed=d.seed + (not train),
    num_rows=d.synthetic.num_rows,
    num_epochs=read.num_epochs,
    stall_after=d.synthetic.stall_after_steps if train else 0,
  )


# Every ``config.data.kind``; its config section ``config.data.<kind>`` is in ``defaults.py``.
DATA_KINDS: dict[str, DataKind] = {
  # the packed astro-ph corpus (``data/pipeline.py``, from ``prepare``)
  "lm": DataKind(
    read=_lm,
    needs=(
      ("lm.path", "--config.data.lm.path=DIR (the --output of python -m astrollama_jax prepare)"),
    ),
    not_identity=("worker_count",),
    check=_check_lm_validation,
  ),
  # packed, loss-masked chat conversations (``data/chat_dataset.py``)
  "sft": DataKind(
    read=_sft,
    needs=(
      (
        "sft.sources",
        "--config.data.sft.sources (chat files: list of {path, format, count, weight})",
      ),
    ),
    not_identity=("eval_sources",),
    has_split=lambda d, split: split == "train" or bool(d.sft.eval_sources),
  ),
  # deterministic rows of simple token sequences (below), for throughput runs and tests
  "synthetic": DataKind(
    read=_synthetic,
    tokenized=False,
    batches_per_epoch=lambda c: c.data.synthetic.num_rows // c.train.global_batch_size,
  ),
}


def data_kind(config: Any) -> DataKind:
  """The ``DATA_KINDS`` entry ``config.data.kind`` names; one line naming the kinds if none."""
  kind = DATA_KINDS.get(config.data.kind)
  if kind is None:
    raise ValueError(f"config.data.kind {config.data.kind!r} is not one of {tuple(DATA_KINDS)}")
  return kind


def make_dataset(
  config: Any,
  split: str,
  *,
  batch_size: int | None = None,
  num_epochs: int | None = None,
  shuffle: bool | None = None,
  drop_remainder: bool = True,
) -> grain.IterDataset:
  """This process's batches of ``split`` ('train' or 'validation') for ``config.data``.

  ``batch_size`` is the global batch (default ``config.train.global_batch_size``);
  ``num_epochs=None`` repeats forever; ``drop_remainder=False`` keeps a last partial batch of
  tokenized kinds (``pad_rows`` fills it up). Their training data is read in ``data_shards``
  virtual shards (``data/shards.py``), so the global batches, and a checkpoint's data position,
  do not depend on the process count. The validation split (read whole, never resumed, see
  ``loop.evaluate``) keeps one shard per process.
  """
  kind = data_kind(config)
  global_batch = batch_size or config.train.global_batch_size
  read = Read(
    split=split,
    global_batch=global_batch,
    batch_size=local_batch_size(global_batch),
    shards=data_shards(config, global_batch) if split == "train" else jax.process_count(),
    num_epochs=num_epochs,
    shuffle=config.data.shuffle if shuffle is None else shuffle,
    drop_remainder=drop_remainder,
  )
  return kind.read(config.data, read)


# Keys of ``config.data`` that do not change which records a training step reads (besides each
# kind's ``not_identity``).
_NOT_IDENTITY = ("tokenizer_path",)


def run_identity(config: Any) -> dict[str, Any]:
  """What a resumed run must share with the one that saved: the data source, order and batch.

  The shared ``data.*`` keys and those of the active kind's section (``data.lm.path`` made
  absolute, ``data.shards`` resolved), plus the global batch size. The checkpoint keeps them;
  a restore that finds another value stops, naming the key.
  """
  d = config.data.to_dict()
  kind = data_kind(config)
  out: dict[str, Any] = {"train.global_batch_size": int(config.train.global_batch_size)}
  items = [(k, v) for k, v in d.items() if not isinstance(v, dict) and k != "shards"]
  if kind.tokenized:  # synthetic rows are a function of the global row: no shards
    out["data.shards"] = data_shards(config)
  not_identity = _NOT_IDENTITY + tuple(f"{d['kind']}.{k}" for k in kind.not_identity)
  items += [(f"{d['kind']}.{k}", v) for k, v in d.get(d["kind"], {}).items()]
  for name, value in items:
    if name not in not_identity:
      out[f"data.{name}"] = os.path.abspath(value) if name == "lm.path" and value else value
  return out


def has_split(config: Any, split: str) -> bool:
  """Whether ``split`` can be read (SFT validation needs ``data.sft.eval_sources``)."""
  return data_kind(config).has_split(config.data, split)


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


def pad_rows(local: dict[str, np.ndarray] | None, rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """``local`` with empty rows (padding: no loss, segment 0) appended up to ``rows``; all empty
  for None (a process whose data ran out while others' did not)."""
  have = 0 if local is None else len(local[BATCH_KEYS[0]])
  if have == rows:
    return local
  empty = {k: np.zeros((rows - have, seq_len), dtype) for k, dtype in BATCH_SPEC.items()}
  if local is None:
    return empty
  return {k: np.concatenate([np.asarray(local[k], BATCH_SPEC[k]), empty[k]]) for k in BATCH_KEYS}


def batch_hash(local: dict[str, np.ndarray]) -> str:
  """A short digest of the global batch, logged per step to prove which data a step consumed.

  A digest of every row's digest in global row order (rows gathered from every process), so a
  step's hash is the same whatever the process count that fed it.
  """
  rows = np.stack([_row_digest(local, i) for i in range(len(local[BATCH_KEYS[0]]))])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, rows.shape[-1])
  return hashlib.blake2b(rows.tobytes(), digest_size=8).hexdigest()


def _row_digest(local: dict[str, np.ndarray], i: int) -> np.ndarray:
  h = hashlib.blake2b(digest_size=8)
  for k in BATCH_KEYS:
    h.update(np.ascontiguousarray(local[k][i]).tobytes())
  return np.frombuffer(h.digest(), np.uint8)


def count_batches(it: Iterator[Any], limit: int | None = None) -> int:
  """Exhaust an iterator (one epoch), counting its batches."""
  n = 0
  for _ in it:
    n += 1
    if limit is not None and n >= limit:
      break
  return n
