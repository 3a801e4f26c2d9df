"""checkpoints: save_params / load_model of every path kind, restores onto meshes, atomicity."""

import json
import os
import shutil

from hf_reference import TINY_GQA
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental import v1
import pytest

from astrollama_jax import sharding
from astrollama_jax.checkpoints import layout, loader, reader, writer
from astrollama_jax.model import llama

CFG = TINY_GQA  # GQA, float32 params and compute
TOKENS = np.array([[1, 450, 5192, 310, 278, 11563, 338, 263, 12301, 29889, 13, 1576]], np.int32)


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(np.asarray, llama.init_params(CFG, seed=3))


@pytest.fixture(scope="module")
def converted(params, tmp_path_factory, tokenizer_path):
  out = str(tmp_path_factory.mktemp("ckpt") / "converted")
  writer.save_params(out, CFG, params, tokenizer_path)
  return out


def _logits(cfg, params, mesh=None):
  if mesh is None:
    return np.asarray(llama.apply(cfg, params, jnp.asarray(TOKENS))[0])
  with jax.set_mesh(mesh):
    return np.asarray(jax.jit(lambda p, t: llama.apply(cfg, p, t)[0])(params, jnp.asarray(TOKENS)))


def _assert_same(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_converted_dir_round_trip_is_bit_exact(converted, params, tokenizer_path):
  assert sorted(os.listdir(converted)) == ["model_config.json", "params", "tokenizer.model"]
  assert not [f for f in os.listdir(os.path.dirname(converted)) if f.endswith(".partial")]
  loaded = loader.load_model(converted)
  assert loaded.kind == "converted" and loaded.cfg == CFG
  assert open(loaded.tokenizer_path, "rb").read() == open(tokenizer_path, "rb").read()
  _assert_same(loaded.params, params)


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)], ids=["fsdp8", "fsdp4_tp2"])
def test_restore_onto_meshes_gives_same_logits(converted, params, shape):
  ref = _logits(CFG, params)
  mesh = sharding.make_mesh(shape)
  loaded = loader.load_model(converted, mesh=mesh)
  want = llama.param_shardings(CFG, mesh)
  for (path, arr), sh in zip(
    jax.tree_util.tree_flatten_with_path(loaded.params)[0], jax.tree.leaves(want)
  ):
    assert arr.sharding.is_equivalent_to(sh, arr.ndim), jax.tree_util.keystr(path)
    # Each device holds only its slice: no full copy of a sharded parameter anywhere.
    for shard in arr.addressable_shards:
      assert shard.data.shape == sh.shard_shape(arr.shape)
  assert (
    loaded.params["layers"]["mlp"]["gate_proj"].addressable_shards[0].data.shape[1]
    == CFG.dim // shape[1]
  )
  np.testing.assert_allclose(_logits(CFG, loaded.params, mesh), ref, atol=1e-5, rtol=0)


def test_restore_casts_dtype(converted, params):
  loaded = loader.load_model(converted, dtype="bfloat16")
  assert loaded.cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype("bfloat16")}
  np.testing.assert_array_equal(
    np.asarray(loaded.params["embed"]), params["embed"].astype(jnp.bfloat16)
  )
  with pytest.raises(ValueError, match="unknown dtype 'int7'"):
    loader.load_model(converted, dtype="int7")


def test_big_arrays_are_chunked_for_partial_reads(params, tmp_path, monkeypatch):
  monkeypatch.setattr(writer, "CHUNK_BYTES", 64 * 1024)
  out = writer.save_params(str(tmp_path / "c"), CFG, params)
  embed = reader.stored_metadata(os.path.join(out, "params"))["embed"]
  assert np.prod(embed.storage_metadata.chunk_shape) * 4 <= 64 * 1024 < np.prod(embed.shape) * 4


def _write_workdir(root, params, steps, tokenizer_path):
  """A training WORKDIR as the trainer writes it: params, opt_state, train_meta per step."""
  os.makedirs(root)
  with open(os.path.join(root, "model_config.json"), "w") as f:
    f.write(CFG.to_json())
  shutil.copyfile(tokenizer_path, os.path.join(root, "tokenizer.model"))
  mgr = ocp.CheckpointManager(os.path.join(root, "checkpoints"))
  for step in steps:
    p = jax.tree.map(lambda x, step=step: x + step, params)
    opt = {"mu": jax.tree.map(np.zeros_like, params), "count": np.int32(step)}
    mgr.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(p),
        opt_state=ocp.args.StandardSave(opt),
        train_meta=ocp.args.JsonSave({"step": step}),
      ),
    )
  mgr.wait_until_finished()
  mgr.close()


def test_workdir_latest_step_and_step_folder_read_params_only(params, tmp_path, tokenizer_path):
  root = str(tmp_path / "workdir")
  _write_workdir(root, params, [10, 20], tokenizer_path)
  # An interrupted save of step 30 (Orbax's temporary name) must be ignored.
  shutil.copytree(
    os.path.join(root, "checkpoints", "20"),
    os.path.join(root, "checkpoints", "30.orbax-checkpoint-tmp-1234"),
  )
  # The optimizer state is never read: destroy it and loading still works.
  for step in ("10", "20"):
    shutil.rmtree(os.path.join(root, "checkpoints", step, "opt_state"))
  latest = loader.load_model(root)
  assert (latest.kind, latest.step) == ("workdir", 20)
  _assert_same(latest.params, jax.tree.map(lambda x: x + 20, params))
  assert latest.tokenizer_path == os.path.join(root, "tokenizer.model")
  first = loader.load_model(os.path.join(root, "checkpoints", "10"))
  assert (first.kind, first.step) == ("step", 10)
  _assert_same(first.params, jax.tree.map(lambda x: x + 10, params))
  with pytest.raises(layout.CheckpointError, match="not a complete checkpoint step"):
    loader.load_model(os.path.join(root, "checkpoints", "30.orbax-checkpoint-tmp-1234"))


def test_hf_folder_loads(tmp_path, params):
  from astrollama_jax.formats import hf

  hf.save_hf(CFG, params, str(tmp_path / "hf"))
  loaded = loader.load_model(str(tmp_path / "hf"), mesh=sharding.make_mesh((1, 4, 2)))
  assert loaded.kind == "hf" and loaded.tokenizer_path is None
  _assert_same(loaded.params, params)


def test_config_that_does_not_fit_the_params_names_the_tensor(converted, tmp_path):
  bad = str(tmp_path / "bad")
  shutil.copytree(converted, bad)
  cfg = json.load(open(os.path.join(bad, "model_config.json")))
  cfg["ffn_dim"] = 96
  json.dump(cfg, open(os.path.join(bad, "model_config.json"), "w"))
  with pytest.raises(
    layout.CheckpointError,
    match=r"\['layers'\]\['mlp'\]\['down_proj'\] has shape "
    r"\(2, 128, 64\) but the model config expects \(2, 96, 64\)",
  ):
    loader.load_model(bad)


def test_failed_save_leaves_nothing_that_looks_complete(params, tmp_path, monkeypatch):
  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(v1.partial, "save", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    writer.save_params(str(tmp_path / "out"), CFG, params)
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep me")
  with pytest.raises(FileExistsError, match="not empty"):
    writer.save_params(str(tmp_path / "full"), CFG, params)
  assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_not_a_model_is_a_clear_error(tmp_path):
  with pytest.raises(layout.CheckpointError, match="is not a model"):
    loader.load_model(str(tmp_path))
  with pytest.raises(layout.CheckpointError, match="is not a directory"):
    loader.load_model(str(tmp_path / "nope"))
