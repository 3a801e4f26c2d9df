"""Meta consolidated.*.pth -> converted Orbax DIR, checked against transformers on the same weights.

The fake Meta checkpoints are written here from a random HF model with this file's own inverse
of HF's q/k permutation and its own model-parallel split, so the converter is checked against
an independent statement of Meta's layout, not against itself.
"""

import json
import os
import subprocess
import sys

from helpers_models import write_meta_checkpoint
from hf_reference import TINY, TINY_GQA, hf_logits, make_hf_model
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from astrollama_jax.checkpoints import loader, reader, writer
from astrollama_jax.commands.convert import convert
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.formats import meta
from astrollama_jax.formats.mapping import ConversionError
from astrollama_jax.model import llama
from astrollama_jax.model.config import get_config

TINY_70B = get_config("tiny_70b_shape", compute_dtype="float32")


def _ids(tokenizer_path, abstracts, n=2, length=48):
  tok = Tokenizer(tokenizer_path)
  return np.array([tok.encode(a)[:length] for a in abstracts[:n]], np.int32)


CASES = [(TINY, 2), (TINY_GQA, 2), (TINY_70B, 8)]


@pytest.fixture(scope="module", params=CASES, ids=["mha_mp2", "gqa_mp2", "70b_shape_gqa_mp8"])
def converted(request, tmp_path_factory, tokenizer_path):
  cfg, mp = request.param
  root = tmp_path_factory.mktemp("meta")
  model = make_hf_model(cfg, seed=7)
  src = write_meta_checkpoint(model, cfg, str(root / "meta"), mp, tokenizer_path=tokenizer_path)
  summary = convert("meta", src, str(root / "out"), show_progress=False)
  return cfg, mp, model, src, summary


def test_meta_logits_match_hf(converted, tokenizer_path, abstracts):
  cfg, mp, model, _, summary = converted
  assert summary["shards"] == mp
  assert summary["tensors"] == 9 * cfg.n_layers + 3
  assert summary["parameters"] == cfg.num_params()
  loaded = loader.load_model(summary["output"])
  for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
    assert getattr(loaded.cfg, field) == getattr(cfg, field), field
  assert loaded.cfg.param_dtype == "float32"
  ids = _ids(tokenizer_path, abstracts)
  ours, _ = llama.apply(
    loaded.cfg.replace(compute_dtype="float32"), loaded.params, jnp.asarray(ids)
  )
  np.testing.assert_allclose(np.asarray(ours), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_bfloat16_shards_convert_exactly(tmp_path, tokenizer_path):
  """bf16 Meta shards (the real downloads' dtype) keep their bits; --dtype casts like torch does."""
  cfg = TINY_GQA
  model = make_hf_model(cfg, seed=2)
  f32 = write_meta_checkpoint(model, cfg, str(tmp_path / "f32"), 2, tokenizer_path=tokenizer_path)
  b16 = write_meta_checkpoint(model, cfg, str(tmp_path / "b16"), 2, torch.bfloat16, tokenizer_path)
  s16 = convert("meta", b16, str(tmp_path / "o16"), show_progress=False)
  s32 = convert("meta", f32, str(tmp_path / "o32"), dtype="bfloat16", show_progress=False)
  assert s16["dtype"] == s32["dtype"] == "bfloat16"
  a = loader.load_model(s16["output"], on_host=True)
  b = loader.load_model(s32["output"], on_host=True)
  assert a.cfg.param_dtype == "bfloat16"
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    assert x.dtype == y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize(
  "params_json,ffn",
  [
    ({"dim": 4096, "multiple_of": 256}, 11008),  # 7B
    ({"dim": 5120, "multiple_of": 256}, 13824),  # 13B
    ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}, 28672),  # 70B
  ],
)
def test_ffn_dim_formula_matches_published_shapes(params_json, ffn):
  assert (
    meta.ffn_dim_from_params(
      params_json["dim"], params_json["multiple_of"], params_json.get("ffn_dim_multiplier")
    )
    == ffn
  )


@pytest.fixture(scope="module")
def meta8(tmp_path_factory, tokenizer_path):
  """A 70B-shaped tiny Meta checkpoint over 8 files, to break in the error tests (copied first)."""
  root = tmp_path_factory.mktemp("meta8")
  return write_meta_checkpoint(
    make_hf_model(TINY_70B, seed=3), TINY_70B, str(root / "src"), 8, tokenizer_path=tokenizer_path
  )


def _broken(meta8, tmp_path):
  import shutil

  dst = str(tmp_path / "broken")
  shutil.copytree(meta8, dst, symlinks=True)
  return dst


def _fails(src, tmp_path, match, **kw):
  out = tmp_path / "out"
  with pytest.raises((ConversionError, ValueError, FileNotFoundError), match=match):
    convert("meta", src, str(out), show_progress=False, **kw)
  left = [f for f in os.listdir(tmp_path) if f not in ("broken",)]
  assert left == [], f"a failed conversion left {left}"


def test_missing_middle_shard_is_named(meta8, tmp_path):
  src = _broken(meta8, tmp_path)
  os.remove(os.path.join(src, "consolidated.03.pth"))
  _fails(src, tmp_path, r"shards \['consolidated\.03\.pth'\] are missing")


def test_missing_last_shard_names_file_tensor_and_shapes(meta8, tmp_path):
  src = _broken(meta8, tmp_path)
  os.remove(os.path.join(src, "consolidated.07.pth"))
  _fails(
    src,
    tmp_path,
    r"tensor 'tok_embeddings\.weight': the 7 model-parallel shard\(s\) \['consolidated\.00\.pth'"
    r".* have shapes \[\(32000, 16\), .*merged on dim 1 that is \(32000, 112\), but "
    r"params\.json implies \(32000, 128\)",
  )


def test_params_json_that_does_not_match_the_tensors(meta8, tmp_path):
  src = _broken(meta8, tmp_path)
  p = json.load(open(os.path.join(src, "params.json")))
  p["n_kv_heads"] = 4
  json.dump(p, open(os.path.join(src, "params.json"), "w"))
  _fails(
    src,
    tmp_path,
    r"tensor 'layers\.0\.attention\.wk\.weight': .* have shapes \[\(8, 128\), .*"
    r"that is \(64, 128\), but params\.json implies \(32, 128\)",
  )


def test_params_json_with_too_few_layers_is_refused(meta8, tmp_path):
  src = _broken(meta8, tmp_path)
  p = json.load(open(os.path.join(src, "params.json")))
  p["n_layers"] = 1
  json.dump(p, open(os.path.join(src, "params.json"), "w"))
  _fails(
    src,
    tmp_path,
    r"consolidated\.00\.pth: tensor 'layers\.1\..*' belongs to layer 1 but params\.json "
    r"has n_layers=1",
  )


def test_truncated_shard_names_the_file(meta8, tmp_path):
  src = _broken(meta8, tmp_path)
  fn = os.path.join(src, "consolidated.05.pth")
  data = open(fn, "rb").read()
  with open(fn, "wb") as f:
    f.write(data[: len(data) // 2])
  _fails(src, tmp_path, r"cannot read Meta shard .*consolidated\.05\.pth")


def test_unknown_dtype_and_existing_output_are_refused(meta8, tmp_path):
  _fails(meta8, tmp_path, r"unknown dtype 'float8'", dtype="float8")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep").write_text("x")
  with pytest.raises(FileExistsError):
    convert("meta", meta8, str(tmp_path / "out"), show_progress=False)
  assert (tmp_path / "out" / "keep").read_text() == "x"


def test_interrupted_conversion_leaves_no_complete_looking_folder(meta8, tmp_path, monkeypatch):
  real = meta._interleaved_to_half_split
  calls = []

  def interrupt(w, n):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(w, n)

  monkeypatch.setattr(meta, "_interleaved_to_half_split", interrupt)
  with pytest.raises(KeyboardInterrupt):
    convert("meta", meta8, str(tmp_path / "out"), show_progress=False)
  assert os.listdir(tmp_path) == []


def test_convert_command_line(meta8, tmp_path):
  out = tmp_path / "cli"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "convert",
      "--source_format=meta",
      f"--source={meta8}",
      f"--output={out}",
      "--dtype=bfloat16",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["tensors"] == 9 * TINY_70B.n_layers + 3 and summary["shards"] == 8
  assert summary["dtype"] == "bfloat16" and summary["peak_rss_bytes"] > 0
  assert summary["bytes"] == 2 * TINY_70B.num_params()
  assert "tensor" in proc.stderr  # the per-tensor progress bar
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "convert",
      "--source_format=meta",
      f"--source={meta8}",
      f"--output={tmp_path / 'bad'}",
      "--dtype=int4",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert bad.returncode != 0 and "unknown dtype 'int4'" in bad.stderr


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)], ids=["fsdp8", "fsdp4_tp2"])
def test_converted_checkpoint_restores_onto_meshes(
  meta8, tmp_path, tokenizer_path, abstracts, shape, monkeypatch
):
  """Small chunks, so every device reads only the chunks of its own shard."""
  from astrollama_jax import sharding

  monkeypatch.setattr(writer, "CHUNK_BYTES", 64 * 1024)
  out = convert("meta", meta8, str(tmp_path / "out"), show_progress=False)["output"]
  meta_tree = reader.stored_metadata(os.path.join(out, "params"))
  embed = meta_tree["embed"]
  assert np.prod(embed.storage_metadata.chunk_shape) < np.prod(embed.shape)
  cfg = TINY_70B
  ids = _ids(tokenizer_path, abstracts)
  ref, _ = llama.apply(cfg, loader.load_model(out).params, jnp.asarray(ids))
  mesh = sharding.make_mesh(shape)
  loaded = loader.load_model(out, mesh=mesh)
  for arr, sh in zip(
    jax.tree.leaves(loaded.params), jax.tree.leaves(llama.param_shardings(cfg, mesh))
  ):
    assert arr.sharding.is_equivalent_to(sh, arr.ndim)
    assert all(s.data.shape == sh.shard_shape(arr.shape) for s in arr.addressable_shards)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, t: llama.apply(cfg, p, t)[0])(loaded.params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "key,value", [("dim", 0), ("n_layers", -1), ("n_heads", "4"), ("n_kv_heads", 0), ("norm_eps", -1)]
)
def test_params_json_with_a_non_positive_size_is_refused_before_any_shard_is_read(
  meta8, tmp_path, key, value
):
  src = _broken(meta8, tmp_path)
  p = json.load(open(os.path.join(src, "params.json")))
  p[key] = value
  json.dump(p, open(os.path.join(src, "params.json"), "w"))
  for name in os.listdir(src):  # no shard is opened: removing them changes nothing
    if name.endswith(".pth"):
      os.remove(os.path.join(src, name))
  _fails(src, tmp_path, rf"params\.json: sizes must be positive numbers: {key}={value!r}")


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("use_scaled_rope", "yes", r"use_scaled_rope must be true or false, got 'yes'"),
    ("rope_theta", -1, r"rope_theta must be a positive number, got -1"),
    ("rope_scaling_factor", 0, r"rope_scaling_factor must be a positive number, got 0"),
  ],
)
def test_bad_llama3_rope_fields_are_refused_before_any_shard_is_read(
  meta8, tmp_path, key, value, message
):
  src = _broken(meta8, tmp_path)
  p = json.load(open(os.path.join(src, "params.json")))
  json.dump({**p, key: value}, open(os.path.join(src, "params.json"), "w"))
  for name in os.listdir(src):
    if name.endswith(".pth"):
      os.remove(os.path.join(src, name))
  _fails(src, tmp_path, r"params\.json: " + message)
