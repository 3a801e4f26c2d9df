"""What ``python -m astrollama_jax bench`` times: a training config on synthetic data.

    --config=configs/bench.py                  # LLaMA-2-7B shapes
    --config=configs/bench.py:tiny             # any model preset (astrollama_jax.model.config)
    --config=configs/bench.py:llama2_7b --config.model.n_layers=8 --config.data.seq_len=4096

The step is the trainer's own (the same config keys, the same compiled program), so every
``--config.*`` override of ``train`` works here: ``model.attention_impl``, ``model.remat_policy``,
``model.param_dtype``, ``optimizer.moments_dtype``, ``train.grad_accum_steps``,
``loss.chunk_size``, ``mesh``. ``train.global_batch_size`` is also the decode batch.
"""

from astrollama_jax.model.config import PRESETS
from astrollama_jax.train.defaults import base_config


def get_config(preset: str = "llama2_7b"):
  if preset not in PRESETS:
    raise ValueError(f"bench: unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
  c = base_config()
  c.model.preset = preset
  c.model.remat_policy = "full"
  c.data.kind = "synthetic"
  c.data.seq_len = 4096
  c.train.global_batch_size = 1
  return c
