"""An update: a new dataset version from the newest one plus the units it does not hold yet.

The new records are written as a dataset of their own (the delta), then the new version is
assembled beside the old one: the old shards as hard links (a shard that loses records to a
newer version of a paper is rewritten without them), the delta's shards after them, one
``dataset_info.json`` over both and the indexes merged. The old versions stay as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil

import numpy as np
import tensorflow_datasets as tfds

from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.corpus.indexes import save_indexes
from astrollama_jax.data.corpus.manifest import manifest_head
from astrollama_jax.data.corpus.plan import Stored, make_plan
from astrollama_jax.data.corpus.read import (
  DATASET_NAME,
  MANIFEST,
  SPLITS,
  UNITS,
  dataset_dir,
  record_keys,
  shard_files,
  shard_name,
)
from astrollama_jax.data.corpus.tfds_builder import write_tfds


def _link_or_copy(src: Path, dst: Path) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def _next_version(ds_dir: Path) -> str:
  major, minor, _ = (int(x) for x in ds_dir.name.split("."))
  return f"{major}.{minor + 1}.0"


def _assemble(
  old_dir: Path, delta_dir: Path, new_dir: Path, dropped: dict[str, np.ndarray], version: str
) -> None:
  """A new version folder: the old shards (hard links; a shard that loses records is rewritten
  without them) then the delta's shards, one ``dataset_info.json`` over both, and the
  indexes merged (old record positions shift past the dropped ones, the delta's come after)."""
  from array_record.python import array_record_data_source, array_record_module

  new_dir.mkdir(parents=True)
  old_info = json.loads((old_dir / "dataset_info.json").read_text())
  delta_info = json.loads((delta_dir / "dataset_info.json").read_text())
  old_keys = record_keys(old_dir)
  delta_keys = record_keys(delta_dir)
  splits, keys = [], {}
  for split in SPLITS:
    old, delta = shard_files(old_dir, old_info, split), shard_files(delta_dir, delta_info, split)
    drop = {int(i) for i in dropped.get(split, ())}
    n_total = len(old) + len(delta)
    lengths, start = [], 0
    for i, (path, n) in enumerate(old + delta):
      target = new_dir / shard_name(split, i, n_total)
      is_old = i < len(old)
      lost = [j for j in range(n) if start + j in drop] if is_old else []
      if lost:
        src = array_record_data_source.ArrayRecordDataSource([os.fspath(path)])
        writer = array_record_module.ArrayRecordWriter(os.fspath(target), "group_size:1")
        kept = [j for j in range(n) if start + j not in drop]
        for j in kept:
          writer.write(src[j])
        writer.close()
        lengths.append(len(kept))
      else:
        _link_or_copy(path, target)
        lengths.append(n)
      start += n if is_old else 0
    num_bytes = sum(
      int(s["numBytes"])
      for info in (old_info, delta_info)
      for s in info.get("splits", [])
      if s["name"] == split
    )
    num_bytes -= _bytes_of(old_dir, old_info, split, drop)
    if lengths and sum(lengths):
      splits.append(
        {
          "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
          "name": split,
          "numBytes": str(num_bytes),
          "shardLengths": [str(n) for n in lengths],
        }
      )
    parts = []
    if split in old_keys:
      keep = np.setdiff1d(np.arange(len(old_keys[split]["id"])), sorted(drop))
      parts.append({k: v[keep] for k, v in old_keys[split].items()})
    if split in delta_keys:
      parts.append(delta_keys[split])
    if parts:
      keys[split] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  info = dict(old_info, version=version, splits=splits)
  info["releaseNotes"] = dict(
    old_info.get("releaseNotes", {}), **{version: f"update of {old_dir.name}"}
  )
  (new_dir / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
  shutil.copyfile(old_dir / "features.json", new_dir / "features.json")
  for name in (MANIFEST, UNITS):
    shutil.copyfile(delta_dir / name, new_dir / name)
  save_indexes(new_dir, keys)


def _bytes_of(ds_dir: Path, info: dict, split: str, drop: set[int]) -> int:
  """Serialized size of the records ``drop`` of ``split`` (TFDS counts numBytes that way)."""
  if not drop:
    return 0
  from array_record.python import array_record_data_source

  paths = [os.fspath(p) for p, _ in shard_files(ds_dir, info, split)]
  src = array_record_data_source.ArrayRecordDataSource(paths)
  return sum(len(src[i]) for i in sorted(drop))


def update(config: CorpusConfig, out: Path, work: Path):
  """Grow the newest version under ``out`` with the units it does not hold (parsed under
  ``work``) as the next version; returns (builder of the version now newest, report)."""
  try:
    old_dir = dataset_dir(out)
  except FileNotFoundError:
    raise ValueError(f"--update: no dataset under {out} to update (build it first)") from None
  manifest_config = manifest_head(old_dir).get("config", {})
  old_fraction = manifest_config.get("validation_fraction", config.validation_fraction)
  if old_fraction != config.validation_fraction:
    raise ValueError(
      f"--update: the dataset in {old_dir} splits with validation_fraction "
      f"{old_fraction}, not {config.validation_fraction}; an id must keep its split"
    )
  stored = Stored.load(old_dir)
  plan = make_plan(config, work, stored)
  if plan.is_empty():  # a replacement always brings records, so nothing is dropped either
    from absl import logging

    logging.info("nothing new for %s: it stays as it is", old_dir)
    return tfds.builder_from_directory(os.fspath(old_dir)), plan.report
  scratch = out / f".{DATASET_NAME}-update"
  shutil.rmtree(scratch, ignore_errors=True)
  version = _next_version(old_dir)
  try:
    delta_dir = Path(write_tfds(plan, scratch / "delta").data_dir)
    new_tmp = scratch / version
    _assemble(old_dir, delta_dir, new_tmp, plan.dropped, version)
    new_tmp.rename(old_dir.parent / version)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return tfds.builder_from_directory(os.fspath(old_dir.parent / version)), plan.report
