"""The prepared corpus as training and evaluation read it: folder, splits, texts and indexes.

Everything here reads a dataset the build side wrote (``data/corpus/build.py``) and imports
nothing of it, so the input pipeline and the evaluators load no parser, planner or writer.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import json
import os
from pathlib import Path
import re

import numpy as np
import tensorflow_datasets as tfds

from astrollama_jax.data.latex_sections import SECTION_NAMES

DATASET_NAME = "astro_corpus"  # the TFDS builder's name: OUTPUT/astro_corpus/VERSION/
SPLITS = ("train", "validation")
SECTIONS = SECTION_NAMES
MANIFEST = "manifest.json"
SECTION_INDEX = "section_index.npz"
RECORD_KEYS = "record_keys.npz"
UNITS = "units.json"
_DATE_RE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$")


def check_date(value: str, flag: str) -> str:
  """``value`` if "" or a date YYYY, YYYY-MM or YYYY-MM-DD; else ValueError naming ``flag``."""
  if value and not _DATE_RE.match(value):
    raise ValueError(f"{flag}={value!r} is not a date YYYY, YYYY-MM or YYYY-MM-DD")
  return value


def _version_key(ds_dir: Path) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in ds_dir.name.split("."))
  except ValueError:
    return (-1,)


def dataset_dir(data_dir: str | os.PathLike) -> Path:
  """The newest versioned folder (with dataset_info.json) under ``data_dir``, or ``data_dir``."""
  d = Path(data_dir)
  if (d / "dataset_info.json").exists():
    return d
  found = sorted(
    (
      p.parent
      for p in d.glob(f"{DATASET_NAME}/*/dataset_info.json")
      if not p.parent.name.startswith(".")
    ),
    key=_version_key,
  )
  if not found:
    raise FileNotFoundError(
      f"no astro_corpus dataset under {d} (run astrollama_jax.commands.prepare)"
    )
  return found[-1]


def split_sizes(data_dir: str | os.PathLike) -> dict[str, int]:
  """``{split: records}`` of the corpus under ``data_dir`` (from its metadata; nothing is read)."""
  builder = tfds.builder_from_directory(os.fspath(dataset_dir(data_dir)))
  return {name: int(info.num_examples) for name, info in builder.info.splits.items()}


def read_split(data_dir: str | os.PathLike, split: str):
  """A random-access source of decoded records (dicts of bytes) for one split."""
  builder = tfds.builder_from_directory(os.fspath(dataset_dir(data_dir)))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)} under {data_dir}")
  return builder.as_data_source(split=split)


def shard_name(split: str, i: int, n: int) -> str:
  """File name of shard ``i`` of ``n`` of a split, as TFDS names ArrayRecord shards."""
  return f"{DATASET_NAME}-{split}.array_record-{i:05d}-of-{n:05d}"


def shard_files(ds_dir: Path, info: dict, split: str) -> list[tuple[Path, int]]:
  """(path, records) of every shard of ``split``, from the parsed ``dataset_info.json``."""
  for s in info.get("splits", []):
    if s["name"] == split:
      lengths = [int(x) for x in s["shardLengths"]]
      return [(ds_dir / shard_name(split, i, len(lengths)), n) for i, n in enumerate(lengths)]
  return []


class TextSource:
  """``read_split``'s records, the ``text`` field only: ``{"text": bytes}`` per record, same order.

  The input pipeline reads nothing else, and TFDS's decoding of all seven features costs ~10x
  the ArrayRecord read itself (most of a record's cost besides tokenizing), so the protos are
  parsed here and only ``text`` is taken. Picklable (Grain workers reopen the shards).
  """

  def __init__(self, data_dir: str | os.PathLike, split: str):
    d = dataset_dir(data_dir)
    shards = shard_files(d, json.loads((d / "dataset_info.json").read_text()), split)
    if not shards:
      raise ValueError(f"split {split!r} not in {sorted(split_sizes(d))} under {data_dir}")
    self._paths = [os.fspath(p) for p, _ in shards]
    self._len = sum(n for _, n in shards)
    self._reader = None

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, bytes]:
    from tensorflow_datasets.proto import tf_example_pb2

    if self._reader is None:
      from array_record.python import array_record_data_source

      self._reader = array_record_data_source.ArrayRecordDataSource(self._paths)
    example = tf_example_pb2.Example.FromString(self._reader[int(i)])
    return {"text": example.features.feature["text"].bytes_list.value[0]}

  def __getstate__(self):
    return {**self.__dict__, "_reader": None}

  def __repr__(self) -> str:
    return f"TextSource({len(self)} records)"


def text(value) -> str:
  """A decoded record field as ``str`` (TFDS hands text features over as bytes)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def compute_record_keys(ds_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """``{split: {id, section, version, date}}`` arrays in record order (one pass)."""
  builder = tfds.builder_from_directory(os.fspath(ds_dir))
  out = {}
  for split in builder.info.splits:
    src = builder.as_data_source(split=split)
    cols: dict[str, list] = {"id": [], "section": [], "version": [], "date": []}
    for i in range(len(src)):
      rec = src[i]
      for k in ("id", "section", "date"):
        cols[k].append(text(rec[k]))
      cols["version"].append(int(rec.get("version", 0)))
    out[split] = {
      k: np.asarray(v, np.int32 if k == "version" else np.str_) for k, v in cols.items()
    }
  return out


def section_arrays(keys: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Record indices per ``{split}/{section}`` from the record keys (the saved index's layout)."""
  out = {}
  for split, k in keys.items():
    sections = k["section"].astype(str)
    for name in sorted(set(sections.tolist())):
      out[f"{split}/{name}"] = np.flatnonzero(sections == name).astype(np.int64)
  return dict(sorted(out.items()))


def compute_section_index(ds_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Record indices per ``{split}/{section}`` (one pass over the records)."""
  return section_arrays(compute_record_keys(ds_dir))


def section_index(data_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
  """``{section: record indices}`` for a split (from the saved index, or computed)."""
  d = dataset_dir(data_dir)
  path = d / SECTION_INDEX
  arrays = dict(np.load(path)) if path.exists() else compute_section_index(d)
  prefix = f"{split}/"
  return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def record_keys(data_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """``{split: {id, section, version, date}}`` of every record (saved, or computed)."""
  d = dataset_dir(data_dir)
  path = d / RECORD_KEYS
  if not path.exists():
    return compute_record_keys(d)
  out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  with np.load(path) as z:
    for name in z.files:
      split, key = name.split("/", 1)
      out[split][key] = z[name]
  return dict(out)


def select_records(
  data_dir: str | os.PathLike,
  split: str,
  *,
  since: str = "",
  until: str = "",
  sections: Sequence[str] | None = None,
) -> np.ndarray:
  """Indices of the records of ``split`` dated within [since, until] (inclusive; a bound may be
  YYYY or YYYY-MM: whole periods) and of ``sections`` (all if None): e.g. "everything since
  2024-06" as one mixture component."""
  check_date(since, "since")
  check_date(until, "until")
  keys = record_keys(data_dir).get(split)
  if keys is None:
    return np.zeros(0, np.int64)
  dates = keys["date"].astype(str)
  ok = np.ones(len(dates), bool)
  if since:
    ok &= dates >= since
  if until:
    ok &= np.asarray([d[: len(until)] <= until if d else False for d in dates.tolist()], bool)
  if since or until:
    ok &= dates != ""
  if sections is not None:
    ok &= np.isin(keys["section"].astype(str), list(sections))
  return np.flatnonzero(ok).astype(np.int64)


def component_indices(data_dir: str | os.PathLike, split: str, spec: str) -> np.ndarray:
  """Record indices a mixture component names: space separated terms, each a section name,
  ``since:DATE`` or ``until:DATE`` (e.g. ``"since:2024-06"``, ``"introduction until:2019"``)."""
  sections, bounds = [], {"since": "", "until": ""}
  for term in spec.split():
    key, _, value = term.partition(":")
    if key in bounds and value:
      bounds[key] = value
    elif term in SECTIONS:
      sections.append(term)
    else:
      raise ValueError(
        f"mixture component {spec!r}: {term!r} is neither a section {SECTIONS} "
        "nor since:DATE / until:DATE"
      )
  return select_records(
    data_dir, split, since=bounds["since"], until=bounds["until"], sections=sections or None
  )
