"""The two indexes written beside a dataset version's records, for its readers (``read``).

``section_index.npz`` holds record indices per ``{split}/{section}`` (``read.section_index``),
``record_keys.npz`` the id, section, version and date of every record (``read.record_keys``:
updates and date-bounded mixtures). Both come from the keys as the records were generated, so
writing them costs no second pass over the records.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

from astrollama_jax.data.corpus.read import (
  RECORD_KEYS,
  SECTION_INDEX,
  compute_record_keys,
  section_arrays,
  text,
)


def save_indexes(ds_dir: Path, keys: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Write both indexes of ``ds_dir`` from its record keys; returns the section index."""
  arrays = section_arrays(keys)
  with open(ds_dir / SECTION_INDEX, "wb") as f:
    np.savez(f, **arrays)
  with open(ds_dir / RECORD_KEYS, "wb") as f:
    np.savez(f, **{f"{s}/{k}": v for s, cols in sorted(keys.items()) for k, v in cols.items()})
  return arrays


def written_record_keys(
  ds_dir: str | os.PathLike, written: dict[str, list[tuple]]
) -> dict[str, dict[str, np.ndarray]]:
  """``compute_record_keys`` without reading the records back: from the keys as they were
  generated, in the order TFDS writes them (ascending hash of the key, salted with the split).

  That order is TFDS's, so it is checked on a few records read back (evenly spaced, the first
  and last included); should it ever differ, the keys are read back from all records instead.
  """
  out = {}
  for split, rows in written.items():
    if not rows:
      continue
    hasher = hashing.Hasher(split)
    rows = sorted(rows, key=lambda r: hasher.hash_key(r[0]))
    cols = list(zip(*rows))
    out[split] = {
      "id": np.asarray(cols[1], np.str_),
      "section": np.asarray(cols[2], np.str_),
      "version": np.asarray(cols[3], np.int32),
      "date": np.asarray(cols[4], np.str_),
    }
  builder = tfds.builder_from_directory(os.fspath(ds_dir))
  for split in builder.info.splits:
    src, keys = builder.as_data_source(split=split), out.get(split)
    if keys is None or len(keys["id"]) != len(src):
      break
    probe = [int(i) for i in np.unique(np.linspace(0, len(src) - 1, 17).astype(np.int64))]
    read = [src[i] for i in probe]
    if [(text(r["id"]), text(r["section"])) for r in read] != [
      (keys["id"][i], keys["section"][i]) for i in probe
    ]:
      break
  else:
    if set(out) == set(builder.info.splits):
      return out
  from absl import logging

  logging.warning("records are not in the order they were keyed; reading the keys back")
  return compute_record_keys(ds_dir)
