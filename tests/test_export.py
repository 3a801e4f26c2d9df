"""export: Orbax checkpoints -> HF folders that transformers loads offline, bit-exact both ways."""

import json
import os
import shutil
import subprocess
import sys

from helpers_models import write_meta_checkpoint
from hf_reference import TINY_GQA, hf_logits, make_hf_model
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open
import torch
import transformers

from astrollama_jax.checkpoints import loader
from astrollama_jax.commands.convert import convert
from astrollama_jax.commands.export import export
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.model import llama

CFG = TINY_GQA


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tokenizer_path):
  """original HF model -> Meta shards (mp=2) -> Orbax -> HF export -> Orbax again."""
  root = tmp_path_factory.mktemp("export")
  model = make_hf_model(CFG, seed=11)
  src = write_meta_checkpoint(model, CFG, str(root / "meta"), 2, tokenizer_path=tokenizer_path)
  first = convert("meta", src, str(root / "orbax1"), show_progress=False)["output"]
  exported = export(first, str(root / "hf"), max_shard_bytes=3 * 1024**2, show_progress=False)
  second = convert("hf", exported["output"], str(root / "orbax2"), show_progress=False)["output"]
  return model, first, exported, second


def _ids(tokenizer_path, abstracts):
  tok = Tokenizer(tokenizer_path)
  return np.array([tok.encode(a)[:40] for a in abstracts[:3]], np.int32)


def test_meta_orbax_hf_orbax_is_bit_exact(chain):
  model, first, exported, second = chain
  a = loader.load_model(first, on_host=True)
  b = loader.load_model(second, on_host=True)
  assert a.cfg == b.cfg
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a.params)[0], jax.tree.leaves(b.params)
  ):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # The exported tensors are exactly the original HF model's weights.
  folder = exported["output"]
  index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
  assert exported["shards"] > 1 and len(set(index.values())) == exported["shards"]
  original = model.state_dict()
  assert set(index) == set(original)
  for name, fn in index.items():
    with safe_open(os.path.join(folder, fn), framework="pt") as f:
      assert torch.equal(f.get_tensor(name), original[name]), name


def test_exported_folder_loads_in_transformers_with_the_same_logits(
  chain, tokenizer_path, abstracts
):
  model, first, exported, _ = chain
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
    exported["output"], local_files_only=True
  ).eval()
  ids = _ids(tokenizer_path, abstracts)
  ref = hf_logits(model, ids)
  np.testing.assert_array_equal(hf_logits(reloaded, ids), ref)
  ours = loader.load_model(first)
  got, _ = llama.apply(ours.cfg.replace(compute_dtype="float32"), ours.params, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


def test_exported_tokenizer_matches_ours_on_real_abstracts(chain, tokenizer_path, abstracts):
  folder = chain[2]["output"]
  for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    assert os.path.isfile(os.path.join(folder, f)), f
  assert "[INST]" in json.load(open(os.path.join(folder, "tokenizer_config.json")))["chat_template"]
  theirs = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  ours = Tokenizer(tokenizer_path)
  assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id) == (1, 2)
  for text in abstracts:
    ids = ours.encode(text)  # BOS, no EOS: what transformers adds by default too
    assert theirs(text)["input_ids"] == ids
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, bos=False)
    assert theirs(text)["input_ids"] + [theirs.eos_token_id] == ours.encode(text, eos=True)
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def _workdir(root, params, tokenizer_path):
  os.makedirs(root)
  with open(os.path.join(root, "model_config.json"), "w") as f:
    f.write(CFG.to_json())
  shutil.copyfile(tokenizer_path, os.path.join(root, "tokenizer.model"))
  mgr = ocp.CheckpointManager(os.path.join(root, "checkpoints"))
  for step in (5, 9):
    mgr.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(
          jax.tree.map(lambda x, step=step: x * (1 + step / 100), params)
        ),
        opt_state=ocp.args.StandardSave({"mu": params}),
        train_meta=ocp.args.JsonSave({"step": step}),
      ),
    )
  mgr.wait_until_finished()
  mgr.close()


def test_export_from_a_training_step_takes_params_only(tmp_path, tokenizer_path, abstracts):
  params = llama.init_params(CFG, seed=4)  # sharded jax arrays, as the trainer holds them
  root = str(tmp_path / "workdir")
  _workdir(root, params, tokenizer_path)
  shutil.rmtree(os.path.join(root, "checkpoints", "9", "opt_state"))  # never read
  summary = export(
    os.path.join(root, "checkpoints", "9"),
    str(tmp_path / "hf"),
    dtype="bfloat16",
    show_progress=False,
  )
  assert (summary["kind"], summary["step"], summary["dtype"]) == ("step", 9, "bfloat16")
  assert summary["bytes"] == 2 * CFG.num_params()
  hf_model = transformers.LlamaForCausalLM.from_pretrained(summary["output"], local_files_only=True)
  assert hf_model.dtype == torch.bfloat16
  want = jax.tree.map(lambda x: np.asarray(x * (1 + 9 / 100)).astype(jnp.bfloat16), params)
  back = convert("hf", summary["output"], str(tmp_path / "again"), show_progress=False)
  assert back["dtype"] == "bfloat16"
  got = loader.load_model(back["output"], on_host=True).params
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
  ids = _ids(tokenizer_path, abstracts)
  ref = hf_logits(hf_model.float().eval(), ids)
  ours, _ = llama.apply(CFG, jax.tree.map(lambda x: x.astype(np.float32), want), jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_failed_export_leaves_no_folder(chain, tmp_path, monkeypatch):
  import astrollama_jax.formats.hf_tokenizer as hf_tokenizer

  def boom(*a, **k):
    raise OSError("disk full while writing tokenizer files")

  monkeypatch.setattr(hf_tokenizer, "write_hf_tokenizer_files", boom)
  with pytest.raises(OSError, match="disk full"):
    export(chain[1], str(tmp_path / "hf"), show_progress=False)
  assert os.listdir(tmp_path) == []


def test_export_command_line(chain, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "export",
      f"--checkpoint={chain[1]}",
      f"--output={out}",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["tensors"] == 9 * CFG.n_layers + 3 and summary["parameters"] == CFG.num_params()
  assert summary["kind"] == "converted" and summary["peak_rss_bytes"] > 0
  assert os.path.isfile(out / "config.json") and os.path.isfile(out / "tokenizer_config.json")
