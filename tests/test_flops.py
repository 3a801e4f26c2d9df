"""The MFU FLOP count against hand computations."""

import pytest

from astrollama_jax.model.config import get_config
from astrollama_jax.perf import flops


def test_llama2_7b_flops_per_token_by_hand():
  cfg = get_config("llama2_7b")
  # 32 layers x (4 D^2 attention + 3 D F MLP) weights, plus the 32000 x 4096 LM head.
  matmul_params = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
  assert matmul_params == 6_607_077_376
  # 6 FLOPs per weight per token; causal attention 2 matmuls x 2 FLOPs x S x D / 2, times 3.
  by_hand = 6 * matmul_params + 32 * 3 * (4 * 2048 * 4096) / 2
  assert flops.flops_per_token(cfg, 2048) == pytest.approx(by_hand, rel=1e-12)
  assert by_hand == 41_253_076_992


def test_gqa_uses_kv_heads_and_scales_with_batch():
  cfg = get_config("llama2_70b")
  # Non-embedding, non-norm parameters are all matmul weights; the LM head is one more.
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.dim - cfg.dim * (2 * cfg.n_layers + 1)
  step = flops.training_flops(cfg, batch=3, seq_len=4096)
  assert step.weights == pytest.approx(6 * matmul_params * 3 * 4096, rel=1e-12)
  assert step.attention == pytest.approx(80 * 3 * 2 * 3 * 4096**2 * 8192, rel=1e-12)
  assert step.total == step.weights + step.attention


def test_peaks_and_mfu():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(1e12, 1.0, 1, "cpu") is None
  assert flops.mfu(989e12, 2.0, 4, "NVIDIA H100 80GB HBM3") == pytest.approx(0.125)
