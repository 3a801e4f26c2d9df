"""The README's demo command, shortened to a few steps: prepare -> CPT -> SFT -> HF export -> chat."""

import json
import math
import subprocess
import sys

from test_train_cli import REPO, train_env


def test_demo_end_to_end(tmp_path, tokenizer_path):
  out = subprocess.run([sys.executable, "-m", "astrollama_jax.demo", f"--workdir={tmp_path}",
                        f"--tokenizer={tokenizer_path}", "--steps=6", "--sft_steps=4",
                        "--question=What is a quasar?"], cwd=REPO, env=train_env(1),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  # A random init predicts ~uniformly over the 32,000 pieces: loss ~ ln(32000) = 10.37.
  assert abs(summary["val_loss_before"] - math.log(32000)) < 0.2
  assert summary["val_loss_after"] < summary["val_loss_before"] and summary["loss_fell"]
  assert summary["steps"] == 6
  hf = tmp_path / "hf"
  assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors")) and (hf / "tokenizer.model").is_file()
  assert "validation perplexity, before" in out.stdout
  # SFT ran from the CPT model, and the exported chat model answered through the chat session.
  assert summary["sft_steps"] == 4 and math.isfinite(summary["sft_loss_final"])
  sft_config = json.loads((tmp_path / "sft" / "config.json").read_text())
  assert sft_config["init_checkpoint"] == str(tmp_path / "cpt")
  assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
  assert isinstance(summary["answer"], str)
  assert f"[user] What is a quasar?\n[astrollama-demo] {summary['answer']}" in out.stdout
