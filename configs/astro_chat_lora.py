"""LoRA chat SFT of the astro-ph CPT model: ``astro_chat_sft.py`` with adapters over a frozen base.

    --config=configs/astro_chat_lora.py:7b    # one 80 GB GPU
    --config=configs/astro_chat_lora.py:70b   # eight 80 GB GPUs
    --config=configs/astro_chat_lora.py:3.1-8b    # LLaMA 3.1, as the 7B
    --config=configs/astro_chat_lora.py:3.1-70b   # LLaMA 3.1, as the 70B

Only what differs from the SFT config is stated: rank-16 adapters on every projection (alpha 32,
dropout 0.05, the usual peft recipe), LoRA's higher learning rate, and the smaller meshes the
frozen base (bfloat16, the default) allows (planned with ``python -m
astrollama_jax aot``, see docs/benchmarks.md); micro-batches keep the activations in budget.
"""

import importlib.util
import os

SIZES = {
  "7b": dict(mesh=(1, 1, 1), grad_accum_steps=8, learning_rate=2e-4),
  "70b": dict(mesh=(1, 8, 1), grad_accum_steps=6, learning_rate=1e-4),
  "3.1-8b": dict(mesh=(1, 1, 1), grad_accum_steps=8, learning_rate=2e-4),
  "3.1-70b": dict(mesh=(1, 8, 1), grad_accum_steps=6, learning_rate=1e-4),
}


def _sft_config(size: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "astro_chat_sft.py")
  spec = importlib.util.spec_from_file_location("astro_chat_sft", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


def get_config(size: str = "7b"):
  if size not in SIZES:
    raise ValueError(f"astro_chat_lora: unknown size {size!r}; expected one of {sorted(SIZES)}")
  s = SIZES[size]
  c = _sft_config(size)
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.dropout = 0.05
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.mesh = s["mesh"]
  c.train.grad_accum_steps = s["grad_accum_steps"]
  c.schedule.learning_rate = s["learning_rate"]
  return c
