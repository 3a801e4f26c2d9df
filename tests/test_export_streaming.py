"""export streams: one tensor read at a time from Orbax, written straight into its shard file."""

from __future__ import annotations

import os
import random

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from astrollama_jax.checkpoints import loader, reader, writer
from astrollama_jax.commands.export import export
from astrollama_jax.formats import hf
from astrollama_jax.model import llama
from astrollama_jax.model.config import get_config

CFG = get_config("tiny", vocab_size=32000)


@pytest.mark.parametrize("dtypes", [("float32",), ("bfloat16",), ("float32", "bfloat16")])
def test_the_streamed_file_is_byte_identical_to_save_file(tmp_path, dtypes):
  rng = np.random.default_rng(0)
  tensors = {}
  names = ["model.layers.10.w", "b", "model.layers.2.w", "a.weight", "lm_head.weight"]
  for j, name in enumerate(names):
    dtype = np.dtype(ml_dtypes.bfloat16) if dtypes[j % len(dtypes)] == "bfloat16" else np.float32
    tensors[name] = rng.standard_normal((j + 1, 3 + j)).astype(dtype)
  save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  writer = hf._ShardWriter(str(tmp_path / "streamed.safetensors"), specs)
  names = list(tensors)
  random.Random(1).shuffle(names)  # any order of arrival
  done = [writer.put(k, tensors[k]) for k in names]
  assert done == [False] * (len(names) - 1) + [True]
  assert (tmp_path / "streamed.safetensors").read_bytes() == (
    tmp_path / "reference.safetensors"
  ).read_bytes()


def test_shards_are_planned_like_the_buffered_writer():
  mb = 1024**2
  sizes = [3 * mb, 1 * mb, 5 * mb, 1 * mb]
  specs = [(f"t{i}", (n,), np.dtype(np.uint8)) for i, n in enumerate(sizes)]
  plan = hf.plan_shards(specs, 4 * mb)
  assert [[s[0] for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3"]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_path):
  root = tmp_path_factory.mktemp("stream")
  rng = np.random.default_rng(3)
  params = jax.tree.map(
    lambda s: rng.standard_normal(s.shape).astype(np.float32), llama.param_shapes(CFG)
  )
  return writer.save_params(str(root / "orbax"), CFG, params, tokenizer_path), params


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_lazy_parameters_read_the_same_bits_as_a_restore(converted, dtype):
  folder, _ = converted
  lazy = loader.load_model(folder, dtype=dtype, lazy=True)
  whole = loader.load_model(folder, dtype=dtype, on_host=True)
  assert lazy.cfg == whole.cfg
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(lazy.params)[0], jax.tree.leaves(whole.params)
  ):
    assert (x.shape, x.dtype) == (y.shape, y.dtype), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), y.view(np.uint8))
    if x.ndim >= 2:
      np.testing.assert_array_equal(x[1].view(np.uint8), y[1].view(np.uint8))


def test_export_reads_one_hf_tensor_at_a_time_and_matches_the_whole_model(
  converted, tmp_path, monkeypatch
):
  folder, params = converted
  reads: list[int] = []
  real_get, real_array = reader.StoredArray.__getitem__, reader.StoredArray.__array__

  def get(self, index):
    out = real_get(self, index)
    reads.append(out.nbytes)
    return out

  def whole(self, *args, **kwargs):
    out = real_array(self, *args, **kwargs)
    reads.append(out.nbytes)
    return out

  monkeypatch.setattr(reader.StoredArray, "__getitem__", get)
  monkeypatch.setattr(reader.StoredArray, "__array__", whole)
  out = export(folder, str(tmp_path / "streamed"), max_shard_bytes=2 * 1024**2, show_progress=False)
  largest_hf_tensor = max(
    x[0].nbytes if str(path[0].key) == "layers" else x.nbytes
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
  )
  assert out["shards"] > 1 and len(reads) == out["tensors"]
  assert max(reads) == largest_hf_tensor  # never a whole stacked parameter, never the model

  # The same folder as writing the fully restored model.
  monkeypatch.undo()
  loaded = loader.load_model(folder, on_host=True)
  hf.save_hf(loaded.cfg, loaded.params, str(tmp_path / "whole"), max_shard_bytes=2 * 1024**2)
  files = sorted(os.listdir(tmp_path / "whole"))
  assert [f for f in sorted(os.listdir(tmp_path / "streamed")) if f in files] == files
  for f in files:
    assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
