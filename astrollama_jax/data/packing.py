"""Pack variable-length token examples into fixed-length rows (the trainer's batch format).

Shared by continual pre-training (``pipeline.py``) and chat SFT (``chat_dataset.py``). Both build
per-example dicts and hand them to ``pack_examples`` through ``batches.packed_batches``; the
packed rows are what the trainer's loss expects:

  =============  =======  =====================================================
  key            dtype    meaning (each of shape [seq_len], batched to [B, seq_len])
  =============  =======  =====================================================
  tokens         int32    input ids
  targets        int32    next-token ids (the id each input position predicts)
  segment_ids    int32    1..n numbering the examples packed into a row; 0 = padding
  positions      int32    0-based position within its example (restarts per segment)
  loss_mask      float32  1.0 where the target counts; always 0.0 on padding
  =============  =======  =====================================================

An example is made from a tokenized document ``seq = [BOS] + ids + [EOS]`` as
``tokens = seq[:-1]``, ``targets = seq[1:]`` (``lm_example``); SFT examples set
``loss_mask`` to 1 only on assistant-reply targets. Attention must not cross segments:
the model masks with ``segment_ids`` and uses ``positions`` for the rotary embedding.

Packing uses Grain's own packers (checkpointable, so the iterator state survives):
``concat_then_split`` (default; no padding except at the very end, examples longer than
a row continue in the next row as a new segment with positions restarting at 0) or
``first_fit`` (never splits an example, pads instead; examples longer than ``seq_len``
are truncated first).
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Literal

import grain
import numpy as np

# The batch format (the table above): the one definition the packers, the train step's
# abstract batch and the benchmark's synthetic batch all use.
BATCH_SPEC: dict[str, type[np.generic]] = {
  "tokens": np.int32,
  "targets": np.int32,
  "segment_ids": np.int32,
  "positions": np.int32,
  "loss_mask": np.float32,
}
BATCH_KEYS = tuple(BATCH_SPEC)
FEATURES = ("tokens", "targets", "loss_mask")


def read_options(worker_count: int, streams: int = 1) -> grain.ReadOptions:
  """Grain's read-ahead for each ``to_iter_dataset`` of a pipeline copied into ``worker_count``
  processes (0: the pipeline runs in this one) that reads ``streams`` streams side by side (its
  data shards).

  Grain's defaults (16 threads, 500 elements ahead) suit slow remote reads; here an element is
  a local ArrayRecord read plus SentencePiece under the GIL, and the 500-element buffer is
  scanned on every element (28% of the busy time). Each copy gets its share of the cores (at
  least one thread, at most two: more only contend for the GIL) and 32 elements ahead, split
  over its streams (a full pool per stream made the first batch of 8 shards take 4 s).
  """
  share = (os.cpu_count() or 1) // max(1, worker_count)
  threads, n = max(1, min(2, share)), max(1, streams)
  return grain.ReadOptions(num_threads=max(1, threads // n), prefetch_buffer_size=max(8, 32 // n))


def as_batch(fields: dict) -> dict[str, np.ndarray]:
  """``fields`` (every key of ``BATCH_SPEC``) as arrays of the batch dtypes."""
  return {k: np.asarray(fields[k], dtype) for k, dtype in BATCH_SPEC.items()}


def lm_example(seq: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
  """Next-token example from one tokenized document ``[BOS] + ids + [EOS]`` (n-1 pairs)."""
  seq = np.asarray(seq, np.int32)
  if seq.ndim != 1 or seq.size < 2:
    raise ValueError(f"a document needs at least 2 tokens (BOS and EOS), got shape {seq.shape}")
  return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": np.ones(seq.size - 1, np.float32)}


def _check(example: dict) -> dict:
  n = len(example["tokens"])
  if len(example["targets"]) != n or len(example["loss_mask"]) != n:
    raise ValueError(
      "tokens, targets and loss_mask of an example must have the same length, "
      f"got {n}, {len(example['targets'])}, {len(example['loss_mask'])}"
    )
  return {k: np.asarray(example[k], BATCH_SPEC[k]) for k in FEATURES}


def _to_row(packed: dict) -> dict[str, np.ndarray]:
  seg = np.asarray(packed["tokens_segment_ids"], BATCH_SPEC["segment_ids"])
  return as_batch(
    {
      "tokens": packed["tokens"],
      "targets": packed["targets"],
      "segment_ids": seg,
      "positions": packed["tokens_positions"],
      "loss_mask": np.asarray(packed["loss_mask"], np.float32) * (seg > 0),
    }
  )


def pack_examples(
  examples: grain.IterDataset,
  seq_len: int,
  *,
  method: Literal["concat_then_split", "first_fit"] = "concat_then_split",
  num_packing_bins: int = 16,
  seed: int = 0,
) -> grain.IterDataset:
  """Pack an ``IterDataset`` of examples into rows of length ``seq_len``.

  Args:
    examples: yields dicts with 1-D ``tokens``, ``targets`` (ints) and ``loss_mask``
      (floats, 1.0 where the target is trained on), all of one length per example.
      Extra keys are dropped. ``lm_example`` makes one from a tokenized document.
    seq_len: row length.
    method: ``"concat_then_split"`` (split long examples, near-zero padding; for
      pre-training) or ``"first_fit"`` (keep examples whole, pad; truncates examples
      longer than ``seq_len``; for SFT where a reply should not be cut in two).
    num_packing_bins, seed: first-fit only: rows packed at once, and bin shuffling seed.

  Returns:
    An ``IterDataset`` of unbatched rows ``{tokens, targets, segment_ids, positions,
    loss_mask}``, each of shape ``[seq_len]`` (see the module docstring); follow it with
    ``.batch(batch_size, drop_remainder=True)`` for ``[batch, seq_len]`` arrays. Its
    iterator supports ``get_state``/``set_state``.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  lengths = {k: seq_len for k in FEATURES}
  ds = examples.map(_check)
  if method == "concat_then_split":
    packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
  elif method == "first_fit":
    ds = ds.map(lambda ex: {k: v[:seq_len] for k, v in ex.items()})
    packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=False
    )
  else:
    raise ValueError(f"unknown packing method {method!r}")
  return packed.map(_to_row)
