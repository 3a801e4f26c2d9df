"""Step 3 of a build: ``AstroCorpus``, the TFDS builder that writes a plan's records as
ArrayRecord shards, with the manifest and indexes beside them, byte for byte the same on the
same inputs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

import astrollama_jax.data.corpus as package
from astrollama_jax.data.corpus.indexes import save_indexes, written_record_keys
from astrollama_jax.data.corpus.manifest import write_manifest
from astrollama_jax.data.corpus.plan import Plan, stream_records
from astrollama_jax.data.corpus.read import DATASET_NAME


class AstroCorpus(tfds.core.GeneratorBasedBuilder):
  """Sections of astro-ph papers: one record per (arXiv id, section).

  Built from local files only (``config.sources``); there is nothing to download.
  """

  name = DATASET_NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "abstract / introduction / conclusion records with licence and version."
  }
  # Local files only: no checksums or package metadata to find next to the code. Setting
  # this also stops TFDS from probing the package path, which needs the optional
  # `importlib_resources` module under an editable install.
  code_path = None

  def __init__(self, *, plan: Plan | None = None, **kwargs):
    self._plan = plan
    self._written: dict[str, list[tuple]] = {}  # split -> (key, id, section, version, date)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=package.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "title": tfds.features.Text(),
          "date": tfds.features.Text(),
          "section": tfds.features.Text(),
          "text": tfds.features.Text(),
          "license": tfds.features.Text(),
          "version": tfds.features.Scalar(np.int32),
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    if self._plan is None:
      raise ValueError(
        "AstroCorpus is written by build(CorpusConfig(sources=[...])) (data/corpus/build.py)"
      )
    return {
      split: self._generate_examples(split)
      for split, per in self._plan.report.records.items()
      if sum(per.values())
    }

  def _generate_examples(self, split):
    seen = self._written.setdefault(split, [])
    for rec in stream_records(self._plan, split):
      key = f"{rec['id']}/{rec['section']}"
      seen.append((key, rec["id"], rec["section"], int(rec["version"]), rec["date"]))
      yield key, rec

  def _download_and_prepare(self, dl_manager, download_config):
    """The records, then manifest, units and indexes beside them, all in TFDS's temporary
    folder (``self.data_dir`` here), so that the dataset appears complete in one rename or not
    at all: a truncated index or manifest never sits beside finished records."""
    super()._download_and_prepare(dl_manager, download_config)
    self.info.write_to_directory(self.data_dir)  # so the records can be read back for the index
    ds_dir = Path(self.data_dir)
    write_manifest(ds_dir, self._plan)
    save_indexes(ds_dir, written_record_keys(ds_dir, self._written))


class _LocalFiles:
  """The part of ``tf.io.gfile`` (and ``tf.errors``) TFDS's shuffler uses when it spills to
  disk, on local files: TFDS works without TensorFlow except on that path, so a corpus whose
  records outgrow the shuffler's memory buffer would otherwise fail to import TensorFlow."""

  class errors:  # mirrors tf.errors
    class ResourceExhaustedError(Exception):
      message = ""

  class io:  # mirrors tf.io
    class gfile:  # mirrors tf.io.gfile
      GFile = staticmethod(open)
      exists = staticmethod(os.path.exists)
      remove = staticmethod(os.remove)


@contextlib.contextmanager
def _deterministic_protos():
  """Serialize tf.train.Example with sorted map keys while the dataset is written.

  TFDS calls ``SerializeToString()``; the protobuf runtime then writes the feature map in
  hash-table order, which changes from process to process, so two runs on the same input
  would write different bytes. ``deterministic=True`` sorts the keys. Also: TFDS's shuffler
  (records are ordered by a hash of their key, whatever order they are generated in) keeps up
  to 1 GB in memory before it spills to 1000 bucket files; 16 MiB keeps a build's memory flat,
  and the spill goes through local files (``_LocalFiles``) rather than TensorFlow.
  """
  from tensorflow_datasets.core import shuffle

  cls = example_serializer.ExampleSerializer
  original, buffer, files = cls.serialize_example, shuffle.MAX_MEM_BUFFER_SIZE, shuffle.tf

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  shuffle.MAX_MEM_BUFFER_SIZE = min(buffer, 16 << 20)
  shuffle.tf = _LocalFiles
  try:
    yield
  finally:
    cls.serialize_example = original
    shuffle.MAX_MEM_BUFFER_SIZE = buffer
    shuffle.tf = files


def write_tfds(plan: Plan, data_dir: Path) -> AstroCorpus:
  """Write ``plan``'s records under ``data_dir`` (TFDS's layout: DATASET_NAME/VERSION/)."""
  builder = AstroCorpus(plan=plan, data_dir=os.fspath(data_dir))
  with _deterministic_protos():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
      )
    )
  return builder
