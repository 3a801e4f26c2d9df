"""The config schema: sections, size variants, configs that state only what differs, and the
one-line errors a config that leaves out a required setting gets."""

import ast
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys

from helpers import REPO
from helpers_train import train_env
import pytest

from astrollama_jax.model.config import POLICY_FIELDS, LlamaConfig
from astrollama_jax.train import resolve
from astrollama_jax.train.defaults import base_config

CONFIGS = {
  "demo.py": [()],
  "demo_sft.py": [()],
  "llama2_cpt.py": [("7b",), ("70b",)],
  "llama3_cpt.py": [("8b",), ("70b",)],
  "astro_chat_sft.py": [("7b",), ("70b",), ("3.1-8b",), ("3.1-70b",)],
  "astro_chat_lora.py": [("7b",), ("70b",), ("3.1-8b",), ("3.1-70b",)],
  "bench.py": [("tiny",), ("llama2_70b",)],
}


def _module(name):
  spec = importlib.util.spec_from_file_location(name[:-3], REPO / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_model_section_is_every_llama_config_field():
  model = base_config().model
  assert set(model) == {"preset"} | {f.name for f in dataclasses.fields(LlamaConfig)}
  assert set(POLICY_FIELDS) == {"param_dtype", "compute_dtype", "remat_policy", "attention_impl"}
  assert all(model[k] is None for k in model if k not in POLICY_FIELDS + ("preset",))
  assert {k: model[k] for k in POLICY_FIELDS} == {
    f.name: f.default for f in dataclasses.fields(LlamaConfig) if f.name in POLICY_FIELDS
  }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_state_only_what_differs_from_the_defaults(name):
  """No ``c.SECTION.KEY = <literal>`` line in a config repeats the default it overrides."""
  defaults = base_config()
  restated = []
  for node in ast.walk(ast.parse((REPO / "configs" / name).read_text())):
    if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)):
      continue
    try:
      value = ast.literal_eval(node.value)
    except ValueError:
      continue
    path = ast.unparse(node.targets[0]).split(".")[1:]
    default = defaults
    for key in path:
      default = default[key]
    if default == value:
      restated.append(".".join(path))
  assert restated == []
  for args in CONFIGS[name]:
    _module(name).get_config(*args)


def test_size_variants_are_arguments():
  cpt = _module("llama2_cpt.py")
  small, big = cpt.get_config("7b"), cpt.get_config("70b")
  assert (small.model.preset, small.mesh) == ("llama2_7b", (1, 8, 1))
  assert (big.model.preset, big.mesh) == ("llama2_70b", (1, 32, 2))
  assert (small.train.grad_accum_steps, big.train.grad_accum_steps) == (4, 5)
  assert small.schedule.learning_rate == big.schedule.learning_rate == 2e-5
  with pytest.raises(ValueError, match="llama2_cpt: unknown size '13b'"):
    cpt.get_config("13b")
  l3 = _module("llama3_cpt.py")
  for size, preset in (("8b", "llama3_1_8b"), ("70b", "llama3_1_70b")):
    c = l3.get_config(size)
    assert (c.model.preset, c.data.seq_len) == (preset, 8192)
    micro = c.train.global_batch_size // c.train.grad_accum_steps
    assert micro % (c.mesh[0] * c.mesh[1]) == 0  # every micro-batch splits over the batch shards
  sft = _module("astro_chat_sft.py").get_config("3.1-8b")
  assert sft.model.preset == "llama3_1_8b" and sft.init_checkpoint == "runs/astro_cpt_l3_8b"
  assert sft.data.tokenizer_path == "" and sft.data.sft.chat_template == ""  # from the checkpoint
  with pytest.raises(ValueError, match="bench: unknown model preset 'llama3'"):
    _module("bench.py").get_config("llama3")


def test_inputs_a_kind_needs_are_named(tmp_path):
  config = base_config()
  config.data.kind = "corpus"
  with pytest.raises(
    ValueError, match=r"config.data.kind 'corpus' is not one of \('lm', 'sft', 'synthetic'\)"
  ):
    resolve.check_inputs(config, str(tmp_path))
  config.data.kind = "sft"
  with pytest.raises(
    ValueError,
    match=r"'sft' run needs: pass --config.data.sft.sources .* and "
    r"--config.data.tokenizer_path=FILE",
  ):
    resolve.check_inputs(config, str(tmp_path))
  config.data.kind = "synthetic"
  resolve.check_inputs(config, str(tmp_path))  # needs nothing


def _train_error(*args):
  out = subprocess.run(
    [sys.executable, "-m", "astrollama_jax", "train", *args],
    cwd=REPO,
    env=train_env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  return out.stderr.strip().splitlines()[-1]


def test_demo_config_alone_says_in_one_line_what_to_pass(tmp_path):
  line = _train_error("--config=configs/demo.py", f"--workdir={tmp_path / 'cpt'}")
  assert line.startswith("error: the config leaves out what a 'lm' run needs: pass ")
  assert "--config.data.lm.path=DIR" in line and "--config.data.tokenizer_path=FILE" in line
  assert not (tmp_path / "cpt").exists()  # nothing written before the check
  line = _train_error("--config=configs/demo_sft.py", f"--workdir={tmp_path / 'sft'}")
  assert "'sft' run needs: pass --config.init_checkpoint=DIR" in line


def test_saved_config_json_reads_back(tmp_path):
  from astrollama_jax.model.config import get_config

  config = _module("demo_sft.py").get_config()
  config.init_checkpoint = ""
  resolve.bootstrap_workdir(str(tmp_path), config, get_config("tiny"), None)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["init_checkpoint"] == "" and saved["data"]["kind"] == "sft"
  assert saved["data"]["sft"]["sources"][0]["format"] == "sharegpt"
  assert saved["schedule"]["learning_rate"] == 1e-3 and saved["sharding_rules"]["embed"] == "fsdp"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_are_within_range(name):
  from astrollama_jax.train import config_values

  for args in CONFIGS[name]:
    config_values.check(_module(name).get_config(*args))


def test_numbers_out_of_range_are_refused_up_front(tmp_path):
  cases = [
    ("checkpoint.every", -3, "config.checkpoint.every=-3 is out of range: it must be >= 0"),
    ("schedule.learning_rate", float("nan"), "config.schedule.learning_rate=nan is not a finite"),
    (
      "optimizer.adam_b2",
      1.0,
      "config.optimizer.adam_b2=1.0 is out of range: it must be in [0, 1)",
    ),
    ("train.hang_timeout_s", float("inf"), "config.train.hang_timeout_s=inf is not a finite"),
    ("log.every", 0, "config.log.every=0 is out of range: it must be >= 1"),
  ]
  for key, value, message in cases:
    config = base_config()
    config.data.kind = "synthetic"
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
      resolve.check_inputs(config, str(tmp_path))
  config = base_config()
  config.data.kind = "synthetic"
  resolve.check_inputs(config, str(tmp_path))


def test_an_unknown_key_or_a_negative_interval_is_one_line_before_anything_is_written(tmp_path):
  line = _train_error(
    "--config=configs/demo.py", f"--workdir={tmp_path / 'a'}", "--config.nonexistent.key=1"
  )
  assert line == "error: --config.nonexistent.key=1: the config has no key 'nonexistent'"
  line = _train_error(
    "--config=configs/demo.py",
    f"--workdir={tmp_path / 'b'}",
    "--config.data.kind=synthetic",
    "--config.checkpoint.every=-3",
  )
  assert line == "error: config.checkpoint.every=-3 is out of range: it must be >= 0"
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
