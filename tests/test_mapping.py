"""formats.mapping: one table and stacking loop behind the HF and Meta readers; index checks."""

import json
import os
import subprocess
import sys
import types

from helpers_models import write_meta_checkpoint
from hf_reference import TINY_GQA
import jax
import numpy as np
import pytest
import torch

from astrollama_jax.checkpoints import loader
from astrollama_jax.commands.convert import convert
from astrollama_jax.formats import hf, mapping, meta
from astrollama_jax.formats.mapping import ConversionError
from astrollama_jax.model import llama

CFG = TINY_GQA


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(np.asarray, llama.init_params(CFG, seed=9))


def _flat(tree):
  return {
    tuple(str(k.key) for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_same(got_pairs, want):
  got = dict(got_pairs)
  assert list(got) == [t.path for t in mapping.table(CFG)]  # one parameter at a time, table order
  want = _flat(want)
  assert set(got) == set(want)
  for path, x in got.items():
    assert x.dtype == want[path].dtype and x.shape == want[path].shape, path
    np.testing.assert_array_equal(x, want[path], err_msg=str(path))


def test_the_table_names_every_parameter_and_tensor_once(params):
  paths = [t.path for t in mapping.table(CFG)]
  assert sorted(paths) == sorted(_flat(params)) and len(set(paths)) == len(paths)
  names = [name for name, _ in mapping.hf_tensors(CFG, params)]
  assert len(names) == len(set(names)) == mapping.num_tensors(CFG) == 9 * CFG.n_layers + 3
  assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_round_trip_through_the_hf_reader(params, tmp_path):
  hf.save_hf(CFG, params, str(tmp_path / "hf"), max_shard_bytes=200_000)
  seen = []
  got = hf.iter_hf_params(str(tmp_path / "hf"), CFG, progress=lambda name, w: seen.append(name))
  _assert_same(got, params)
  assert sorted(seen) == sorted(name for name, _ in mapping.hf_tensors(CFG, params))


def test_round_trip_through_the_meta_reader(params, tmp_path):
  """Our params -> HF tensors (the table) -> Meta shards (the test's own split) -> ours."""
  state = {name: torch.from_numpy(np.array(w)) for name, w in mapping.hf_tensors(CFG, params)}
  fake_model = types.SimpleNamespace(state_dict=lambda: state)
  src = write_meta_checkpoint(fake_model, CFG, str(tmp_path / "meta"), mp=2)
  seen = []
  got = meta.iter_meta_params(src, CFG, progress=lambda name, w: seen.append(name))
  _assert_same(got, params)
  assert len(seen) == mapping.num_tensors(CFG)


def test_the_stacking_loop_checks_what_a_reader_gives():
  def wrong_shape(entry, shape):
    yield np.zeros((3, 5), np.float32)

  with pytest.raises(
    ConversionError,
    match=r"tensor 'model\.embed_tokens\.weight' has shape \(3, 5\) "
    r"but the config expects \(32000, 64\)",
  ):
    next(mapping.stack_params(CFG, wrong_shape))

  def one_layer_only(entry, shape):
    yield np.zeros(shape, np.float32)

  stream = mapping.stack_params(CFG, one_layer_only)
  next(stream)  # the embedding is one tensor
  with pytest.raises(ConversionError, match=r"self_attn\.q_proj.*gave 1 tensors, expected 2"):
    next(stream)


@pytest.fixture()
def hf_folder(params, tmp_path):
  folder = tmp_path / "hf"
  hf.save_hf(CFG, params, str(folder), max_shard_bytes=200_000)
  return folder


def _point_outside(folder, target):
  index_file = folder / hf.INDEX_FILE
  index = json.loads(index_file.read_text())
  index["weight_map"]["model.norm.weight"] = target
  index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_index_pointing_outside_the_folder_is_refused(
  hf_folder, tmp_path, tokenizer_path, where
):
  outside = tmp_path / "outside.safetensors"  # exists: the refusal is not a missing-file error
  first = min(hf_folder.glob("*.safetensors"))
  outside.write_bytes(first.read_bytes())
  _point_outside(hf_folder, "../outside.safetensors" if where == "parent" else str(outside))
  match = r"weight_map entry 'model\.norm\.weight' points outside the folder"
  with pytest.raises(ConversionError, match=match):
    convert(
      "hf", str(hf_folder), str(tmp_path / "out"), tokenizer=tokenizer_path, show_progress=False
    )
  assert not (tmp_path / "out").exists()
  with pytest.raises(ConversionError, match=match):
    loader.load_model(str(hf_folder))


def test_convert_command_reports_an_outside_index_in_one_line(hf_folder, tmp_path, tokenizer_path):
  _point_outside(hf_folder, "../../etc/x")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "convert",
      "--source_format=hf",
      f"--source={hf_folder}",
      f"--output={tmp_path / 'out'}",
      f"--tokenizer={tokenizer_path}",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=300,
    check=False,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "points outside the folder ('../../etc/x')" in errors[0], proc.stderr[
    -3000:
  ]
