"""A LoRA workdir exported (merged HF weights, a peft adapter folder) and run directly."""

import json
import os
import shutil

from helpers_models import hf_tensors
from hf_reference import TINY_GQA, hf_logits, save_hf_model
import jax
import numpy as np
import pytest
import torch
import transformers

from astrollama_jax.checkpoints import loader
from astrollama_jax.commands.export import export
from astrollama_jax.formats import peft as peft_io
from astrollama_jax.model import llama, lora
from astrollama_jax.train import loop
from astrollama_jax.train.defaults import base_config

TARGETS = "q,v,o,down"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_path):
  """(HF base folder, LoRA workdir trained on it, merged HF export, peft adapter folder)."""
  root = tmp_path_factory.mktemp("lora_export")
  base = root / "base"
  save_hf_model(TINY_GQA, base, seed=4)
  shutil.copy(tokenizer_path, base / "tokenizer.model")
  c = base_config()
  c.init_checkpoint = str(base)
  c.mesh = (2, 2, 2)
  c.model.compute_dtype = "float32"
  c.data.kind = "synthetic"
  c.data.seq_len = 32
  c.data.synthetic.num_rows = 64
  c.train.global_batch_size = 8
  c.train.num_steps = 4
  c.schedule.learning_rate = 2e-2
  c.eval.at_start = c.eval.at_end = False
  c.eval.every = 0
  c.checkpoint.async_save = False
  c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 4, 12.0, 0.1, TARGETS
  c.lora.base_dtype = "bfloat16"
  workdir = root / "run"
  loop.train(c, str(workdir))
  merged = export(
    str(workdir), str(root / "merged"), peft_adapter=str(root / "adapter"), show_progress=False
  )
  return base, workdir, merged, root / "adapter"


def test_untargeted_weights_are_the_base_bit_for_bit_and_targeted_ones_moved(lora_run):
  base, _, merged, _ = lora_run
  want, got = hf_tensors(base), hf_tensors(merged["output"])
  assert sorted(want) == sorted(got)
  moved = []
  for name, w in want.items():
    assert got[name].dtype == w.dtype, name
    if any(f".{t}." in name for t in ("q_proj", "v_proj", "o_proj", "down_proj")):
      moved.append(float(np.abs(got[name] - w).max()))
    else:
      np.testing.assert_array_equal(got[name], w, err_msg=name)
  assert len(moved) == 4 * TINY_GQA.n_layers and min(moved) > 1e-4


def test_peft_loads_the_adapter_and_matches_the_merged_folder(lora_run, tokenizer_path):
  import peft

  base, workdir, merged, adapter = lora_run
  config = json.loads((adapter / peft_io.ADAPTER_CONFIG).read_text())
  assert config["r"] == 4 and config["lora_alpha"] == 12.0 and config["peft_type"] == "LORA"
  assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
  names = hf_tensors(adapter)
  assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
  assert names["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)

  ids = np.random.default_rng(0).integers(0, 32000, (2, 16))
  with_adapter = peft.PeftModel.from_pretrained(
    transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
  )
  with_adapter.eval()
  full = transformers.LlamaForCausalLM.from_pretrained(merged["output"], dtype=torch.float32).eval()
  plain = transformers.LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
  a, b, c = hf_logits(with_adapter, ids), hf_logits(full, ids), hf_logits(plain, ids)
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  assert np.abs(a - c).max() > 1e-3  # the adapters change the model

  # And our own forward with the adapters as a branch (no merge) gives the same logits.
  loaded = loader.load_model(str(base), on_host=True)
  cfg = loaded.cfg.replace(compute_dtype="float32")
  from astrollama_jax.checkpoints import lora_base

  step = max(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  adapters = lora_base.restore_adapters(str(workdir / "checkpoints" / str(step) / "params"))
  spec = lora_base.read(str(workdir))["spec"]
  ours, _ = llama.apply(cfg, lora.Adapted(loaded.params, adapters, spec), ids)
  np.testing.assert_allclose(np.asarray(ours), b, atol=1e-4, rtol=0)


def test_load_model_on_a_lora_workdir_merges(lora_run):
  base, workdir, merged, _ = lora_run
  loaded = loader.load_model(str(workdir))
  assert loaded.kind == "workdir" and loaded.step == 4 and loaded.tokenizer_path
  exported = loader.load_model(merged["output"], on_host=True)
  base_params = loader.load_model(str(base), on_host=True).params
  for path, want in jax.tree_util.tree_flatten_with_path(exported.params)[0]:
    name = jax.tree_util.keystr(path)
    got, orig = np.asarray(_at(loaded.params, path)), np.asarray(_at(base_params, path))
    if any(t in name for t in ("q_proj", "v_proj", "o_proj", "down_proj")):
      # merged on the device (one compiled program) vs on the host: float32 rounding apart
      np.testing.assert_allclose(got, want, atol=1e-7, rtol=0, err_msg=name)
    else:
      np.testing.assert_array_equal(got, orig, err_msg=name)


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def _generate(checkpoint, output):
  """Greedy completions of the ``generate`` command (a subprocess) for two prompts."""
  import subprocess
  import sys

  from helpers import REPO
  from helpers_train import train_env

  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "generate",
      f"--checkpoint={checkpoint}",
      "--prompt=The Hubble constant",
      "--prompt=Dark matter halos",
      "--max_new_tokens=8",
      "--temperature=0",
      "--compute_dtype=float32",
      f"--output={output}",
    ],
    cwd=REPO,
    env=train_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["generated_tokens"] > 0
  return [json.loads(line)["completion"] for line in open(output)]


def test_generate_and_eval_on_a_lora_workdir_equal_the_merged_export(
  lora_run, tmp_path, capsys, abstracts
):
  from helpers import write_jsonl
  from helpers_models import run_cli

  base, workdir, merged, _ = lora_run
  got = _generate(workdir, tmp_path / "lora.jsonl")
  assert got == _generate(merged["output"], tmp_path / "merged.jsonl")
  assert got != _generate(base, tmp_path / "base.jsonl")  # the adapters are in
  data = tmp_path / "abstracts.jsonl"
  write_jsonl(data, [{"id": f"a{i}", "abstract": a} for i, a in enumerate(abstracts[:4])])
  results = []
  for name, checkpoint in (("lora", workdir), ("merged", merged["output"])):
    results.append(
      run_cli(
        capsys,
        "--task=perplexity",
        f"--checkpoint={checkpoint}",
        f"--output={tmp_path / name}",
        f"--data={data}",
        "--bootstrap=20",
        "--compute_dtype=float32",
        "--batch_size=4",
        "--max_len=64",
      )
    )
  lora_m, merged_m = results[0]["metrics"], results[1]["metrics"]
  assert lora_m.keys() == merged_m.keys()
  for key in lora_m:
    assert lora_m[key] == pytest.approx(merged_m[key], rel=1e-5, abs=1e-6), key


def test_the_export_command_writes_both_folders_and_refuses_an_adapter_of_a_full_model(
  lora_run, tmp_path
):
  import subprocess
  import sys

  from helpers import REPO
  from helpers_train import train_env

  base, workdir, merged, adapter = lora_run

  def run(checkpoint, name):
    return subprocess.run(
      [
        sys.executable,
        "-m",
        "astrollama_jax",
        "export",
        f"--checkpoint={checkpoint}",
        f"--output={tmp_path / name}",
        f"--peft_adapter={tmp_path / (name + '_adapter')}",
      ],
      cwd=REPO,
      env=train_env(1),
      capture_output=True,
      text=True,
      timeout=300,
    )

  out = run(workdir, "cli")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["peft_adapter"] == str(tmp_path / "cli_adapter")
  for name in (peft_io.ADAPTER_WEIGHTS, peft_io.ADAPTER_CONFIG):
    assert (tmp_path / "cli_adapter" / name).read_bytes() == (adapter / name).read_bytes()
  assert hf_tensors(tmp_path / "cli").keys() == hf_tensors(merged["output"]).keys()

  out = run(base, "full")
  assert out.returncode == 1 and "is not a LoRA workdir" in out.stderr
  assert not (tmp_path / "full").exists() and not (tmp_path / "full_adapter").exists()
