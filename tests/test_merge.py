"""merge: a weighted average or task arithmetic of checkpoints, equal to numpy's float32 sum."""

from __future__ import annotations

import json
import os
import shutil

from helpers_models import hf_tensors
from hf_reference import TINY, save_hf_model
import jax
import ml_dtypes
import numpy as np
import pytest

from astrollama_jax.checkpoints import loader, writer
from astrollama_jax.checkpoints.merge import merge
from astrollama_jax.errors import UserError
from astrollama_jax.formats import hf


def _ours(path) -> dict:
  return loader.load_model(str(path), dtype="float32", on_host=True).params


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_path):
  """Three random HF folders of one architecture (a, b, base), and a converted copy of b."""
  root = tmp_path_factory.mktemp("merge")
  out = {}
  for name, seed in (("a", 1), ("b", 2), ("base", 3)):
    save_hf_model(TINY, root / name, seed=seed)
    shutil.copy(tokenizer_path, root / name / "tokenizer.model")
    out[name] = root / name
  b = loader.load_model(str(out["b"]), on_host=True)
  writer.save_params(str(root / "b_ours"), b.cfg, b.params, tokenizer_path)
  out["b_ours"] = root / "b_ours"
  return out


def test_average_of_an_hf_folder_and_a_converted_dir_equals_numpy_in_float32(models, tmp_path):
  summary = merge(
    [str(models["a"]), str(models["b_ours"])], str(tmp_path / "out"), weights=[0.75, 0.25]
  )
  assert summary["recipe"] == "average" and summary["dtype"] == "float32"
  got = _ours(tmp_path / "out")
  a, b = _ours(models["a"]), _ours(models["b"])
  expected = jax.tree.map(lambda x, y: np.float32(0.75) * x + np.float32(0.25) * y, a, b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert (tmp_path / "out" / "tokenizer.model").is_file()


def test_task_arithmetic_to_an_hf_folder_equals_numpy_on_the_safetensors(models, tmp_path):
  w = [np.float32(0.6), np.float32(0.9)]  # need not sum to one over a base
  merge(
    [str(models["a"]), str(models["b"])],
    str(tmp_path / "hf"),
    weights=[0.6, 0.9],
    base=str(models["base"]),
    fmt="hf",
    chat_template="llama3",
    max_shard_bytes=4 * 1024**2,  # several shards
  )
  got = hf_tensors(tmp_path / "hf")
  a, b, base = (hf_tensors(models[k]) for k in ("a", "b", "base"))
  assert got.keys() == a.keys()
  for name in a:
    expected = base[name] + w[0] * (a[name] - base[name]) + w[1] * (b[name] - base[name])
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], expected, err_msg=name)
  config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert "start_header_id" in config["chat_template"]
  assert (tmp_path / "hf" / "tokenizer.model").is_file()


def test_task_arithmetic_to_our_format_equals_numpy_in_float32(models, tmp_path):
  merge(
    [str(models["a"]), str(models["b_ours"])],
    str(tmp_path / "out"),
    weights=[0.5, -0.25],
    base=str(models["base"]),
  )
  got = _ours(tmp_path / "out")
  a, b, base = (_ours(models[k]) for k in ("a", "b", "base"))
  w = np.float32(0.5), np.float32(-0.25)
  expected = jax.tree.map(lambda x, y, o: o + w[0] * (x - o) + w[1] * (y - o), a, b, base)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("fmt", ["ours", "hf"])
def test_bfloat16_output_is_the_float32_sum_rounded_once(models, tmp_path, fmt):
  merge([str(models["a"]), str(models["b"])], str(tmp_path / "bf"), dtype="bfloat16", fmt=fmt)
  loaded = loader.load_model(str(tmp_path / "bf"), on_host=True)
  assert loaded.cfg.param_dtype == "bfloat16"
  a, b = _ours(models["a"]), _ours(models["b"])
  half = np.float32(0.5)
  expected = jax.tree.map(lambda x, y: (half * x + half * y).astype(ml_dtypes.bfloat16), a, b)
  for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
  if fmt == "hf":  # the lazy reader takes the stored dtype from the header
    cfg, lazy = hf.open_hf_params(str(tmp_path / "bf"))
    assert cfg.param_dtype == "bfloat16" and lazy["layers"]["mlp"]["up_proj"][1].dtype == y.dtype


def test_lazy_hf_parameters_read_the_same_bits_as_a_whole_read(models):
  cfg, lazy = hf.open_hf_params(str(models["a"]))
  whole = _ours(models["a"])
  assert cfg.param_dtype == "float32"
  for x, y in zip(jax.tree.leaves(lazy), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.asarray(x), y)
    if x.ndim >= 3:
      np.testing.assert_array_equal(x[1], y[1])


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(weights=[0.7, 0.2]), "sum to 0.9, not 1"),
    (dict(weights=[1.0]), "1 weights for 2 checkpoints"),
    (dict(fmt="gguf"), "format 'gguf' is not one of ours, hf"),
  ],
)
def test_refusals_before_anything_is_written(models, tmp_path, kwargs, message):
  with pytest.raises(UserError, match=message):
    merge([str(models["a"]), str(models["b"])], str(tmp_path / "out"), **kwargs)
  assert not (tmp_path / "out").exists()


def test_refuses_an_output_that_is_an_input_or_not_empty(models, tmp_path):
  with pytest.raises(UserError, match="is the input"):
    merge([str(models["a"]), str(models["b"])], str(models["b"]))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(UserError, match="exists and is not empty"):
    merge([str(models["a"]), str(models["b"])], str(tmp_path / "full"))


def test_refuses_another_architecture(models, tmp_path):
  other = tmp_path / "other"
  save_hf_model(TINY.replace(ffn_dim=96), other, seed=5)
  with pytest.raises(UserError, match="another architecture.*ffn_dim is 96, not 128"):
    merge([str(models["a"]), str(other)], str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_inputs_held_on_the_host_merge_like_lazy_ones(models, tmp_path, monkeypatch):
  """A LoRA workdir reaches merge as ``load_model(lazy=True)`` gives it: its base with the
  adapters merged in, as numpy arrays on the host (loader's contract, tested with a trained
  LoRA workdir in test_lora_export). Such inputs, here a shifted copy of ``a``, mix with lazy
  ones."""
  real = loader.load_model
  shift = np.float32(0.125)

  def load_model(path, **kw):
    loaded = real(path, **kw)
    if path == str(models["a"]):
      whole = real(path, on_host=True)
      loaded.params = jax.tree.map(lambda x: x + shift, whole.params)
      held.append(jax.tree.map(np.copy, loaded.params))
      held.append(loaded.params)
    return loaded

  held: list = []

  monkeypatch.setattr(loader, "load_model", load_model)
  merge([str(models["a"]), str(models["b_ours"])], str(tmp_path / "out"), weights=[0.5, 0.5])
  monkeypatch.undo()
  got, a, b = _ours(tmp_path / "out"), _ours(models["a"]), _ours(models["b"])
  half = np.float32(0.5)
  for x, y, z in zip(jax.tree.leaves(got), jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, half * (y + shift) + half * z)
  for before, after in zip(*(jax.tree.leaves(h) for h in held)):  # inputs never written to
    np.testing.assert_array_equal(before, after)


def test_a_user_error_is_one_line(models, tmp_path):
  from astrollama_jax.commands import cli

  with pytest.raises(SystemExit) as e:
    cli.guard(merge, [str(models["a"]), str(models["b"])], str(tmp_path / "o"), weights=[0.75, 0.5])
  assert str(e.value) == (
    "error: weights 0.75,0.5 sum to 1.25, not 1: an average needs weights summing to one "
    "(for task arithmetic over a base, pass --base)"
  )


def test_the_command_line_merges_to_an_hf_folder(models, tmp_path):
  import subprocess
  import sys

  from helpers import REPO

  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "astrollama_jax", "merge", *args],
      cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=300,
    )

  ins = [f"--checkpoint={models['a']}", f"--checkpoint={models['b_ours']}"]
  out = run(*ins, "--weights=0.75,0.25", "--format=hf", f"--output={tmp_path / 'hf'}")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["format"] == "hf" and summary["weights"] == [0.75, 0.25]
  a, b = hf_tensors(models["a"]), hf_tensors(models["b"])
  got = hf_tensors(tmp_path / "hf")
  for name in a:
    np.testing.assert_array_equal(
      got[name], np.float32(0.75) * a[name] + np.float32(0.25) * b[name]
    )
