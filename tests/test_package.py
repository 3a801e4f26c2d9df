"""The package as a user installs it: a built wheel (not the checkout) in a fresh virtual
environment, run from another folder, finds its configs and demo data and runs the demo, on its
own tokenizer: no real data beside it, nothing downloaded."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

from helpers import REPO
from helpers_train import train_env
import pytest

from astrollama_jax.util import resources


def test_resources_are_found_in_the_checkout():
  assert resources.checkout() == REPO
  assert resources.path("configs", "demo.py") == REPO / "configs" / "demo.py"
  assert resources.path("data", "demo_corpus").is_dir()
  with pytest.raises(FileNotFoundError, match="configs/nope.py"):
    resources.path("configs", "nope.py")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  """A fresh venv holding the wheel built from this tree; its other dependencies are this
  environment's (a .pth file), so nothing is downloaded."""
  root = tmp_path_factory.mktemp("installed")
  # Built from a copy: building writes build/ and *.egg-info/ beside the sources.
  tracked = subprocess.run(
    ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True
  ).stdout.split("\0")
  source = root / "source"
  for name in filter(None, tracked):
    if (REPO / name).is_file():
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / name, source / name)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      str(source),
      "-w",
      str(root / "wheel"),
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  venv = root / "venv"
  subprocess.run(
    [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
  )
  site = pathlib.Path(
    subprocess.run(
      [
        str(venv / "bin" / "python"),
        "-c",
        "import sysconfig; print(sysconfig.get_path('purelib'))",
      ],
      check=True,
      capture_output=True,
      text=True,
    ).stdout.strip()
  )
  wheel = next((root / "wheel").glob("astrollama_jax-*.whl"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "--python",
      str(venv / "bin" / "python"),
      "install",
      "-q",
      "--no-deps",
      "--no-index",
      "--force-reinstall",
      str(wheel),
    ],
    check=True,
    capture_output=True,
    timeout=300,
    env=env,
  )
  # Only now: before the install, pip would have taken the checkout's own editable install,
  # visible through this path, as already satisfying the wheel.
  (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
  return venv


def test_installed_demo_runs_from_another_folder(installed, tmp_path):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = train_env(1)
  env.pop("PYTHONPATH", None)  # the installed package, never this checkout
  where = subprocess.run(
    [
      str(installed / "bin" / "python"),
      "-c",
      "import astrollama_jax, astrollama_jax.util.resources as r; "
      "print(astrollama_jax.__file__); print(r.path('configs', 'demo.py'))",
    ],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  module, config = where.stdout.split()
  assert module.startswith(str(installed)) and config.startswith(str(installed)), where.stdout

  out = subprocess.run(
    [
      str(installed / "bin" / "astrollama-demo"),
      f"--workdir={tmp_path / 'w'}",
      "--steps=6",
      "--sft_steps=4",
      "--question=What is a quasar?",
    ],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  # The demo's own tokenizer, built in the workdir, sizes the model: the demo preset's 4,096.
  tokenizer = tmp_path / "w" / "tokenizer" / "tokenizer.model"
  assert summary["tokenizer"] == str(tokenizer) and summary["vocab_size"] == 4096
  # A random init predicts ~uniformly over the 4,096 pieces: loss ~ ln(4096) = 8.32.
  assert abs(summary["val_loss_before"] - math.log(4096)) < 0.2
  assert summary["val_loss_after"] < summary["val_loss_before"] and summary["loss_fell"]
  assert summary["steps"] == 6
  hf = tmp_path / "w" / "hf"
  assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
  assert (hf / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
  assert json.loads((hf / "config.json").read_text())["vocab_size"] == 4096
  assert "validation perplexity, before" in out.stdout
  # SFT ran from the CPT model, and the exported chat model answered through the chat session.
  assert summary["sft_steps"] == 4 and math.isfinite(summary["sft_loss_final"])
  sft_config = json.loads((tmp_path / "w" / "sft" / "config.json").read_text())
  assert sft_config["init_checkpoint"] == str(tmp_path / "w" / "cpt")
  assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
  assert isinstance(summary["answer"], str)
  assert f"[user] What is a quasar?\n[astrollama-demo] {summary['answer']}" in out.stdout
  assert not any(os.scandir(elsewhere)), "the demo wrote outside its --workdir"
  # transformers reads the exported tokenizer files as the trainer's SentencePiece encodes.
  from transformers import AutoTokenizer, LlamaTokenizer

  from astrollama_jax.data.tokenizer import Tokenizer

  text = "What is a quasar? Its redshift z = 6.3 (about 12.9 Gyr ago) ✓"
  want = Tokenizer(tokenizer).encode(text)
  for cls in (AutoTokenizer, LlamaTokenizer):
    assert cls.from_pretrained(str(hf))(text)["input_ids"] == want, cls


def test_installed_package_ships_the_feedback_page(installed, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  code = (
    "from importlib import resources; "
    "s = resources.files('astrollama_jax.serve') / 'static'; "
    "print(sorted(p.name for p in s.iterdir()))"
  )
  out = subprocess.run(
    [str(installed / "bin" / "python"), "-c", code],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.strip() == "['page.css', 'page.html', 'page.js']"
