"""Model FLOPs of a training step and the device peaks they are measured against (MFU).

The count follows MaxText's ``calculate_tflops_training_per_device`` so that our MFU can be set
beside the figures MaxText publishes:

* every weight matmul ``[tokens, a] x [a, b]`` costs ``2 * tokens * a * b`` forward, and the
  backward pass twice that, hence the factor 3 on the forward count;
* per layer: q/k/v projections ``2 T D (H + 2K) hd``, output projection ``2 T D H hd`` and the
  SwiGLU MLP ``2 T D F * 3`` (gate, up, down);
* the LM head ``2 T D V`` is counted once (the embedding lookup is a gather, not a matmul);
* attention scores and the weighted sum, ``4 B S^2 H hd`` per layer, are **halved for the causal
  mask**, as MaxText counts them (MaxText MFU figures published before it did count the full
  ``S^2``, so they read higher). Packed rows with several documents do less attention work than
  this; like MaxText we count full causal rows.

Norms, rotary embeddings, softmax and the optimizer update are not counted.
"""

from __future__ import annotations

import dataclasses

from astrollama_jax.model.config import LlamaConfig

# Dense bf16 peak FLOP/s per device (no sparsity). Keys are matched as substrings of the
# lower-cased ``jax.Device.device_kind``; the first match wins, so longer names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
  ("h100", 989e12),
  ("h200", 989e12),
  ("a100", 312e12),
  ("tpu v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
  ("tpu v5e", 197e12),
  ("tpu v5p", 459e12),
  ("tpu v5", 459e12),
  ("tpu v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Training FLOPs of one optimizer step (forward + backward), split as MaxText splits them."""

  weights: float  # learnable-weight matmuls, incl. the LM head
  attention: float  # causal attention (QK^T and PV)

  @property
  def total(self) -> float:
    return self.weights + self.attention


def training_flops(cfg: LlamaConfig, batch: int, seq_len: int) -> StepFlops:
  """FLOPs to train on ``batch`` rows of ``seq_len`` tokens (one forward + backward pass)."""
  tokens = batch * seq_len
  d, f, h, k, hd, v = (
    cfg.dim,
    cfg.ffn_dim,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_dim,
    cfg.vocab_size,
  )
  qkv = 2 * tokens * d * (h + 2 * k) * hd
  out_proj = 2 * tokens * d * h * hd
  mlp = 2 * tokens * d * f * 3
  lm_head = 2 * tokens * d * v
  attention = 4 * batch * seq_len**2 * h * hd / 2  # causal: half of the S^2 score matrix
  weights = ((qkv + out_proj + mlp) * cfg.n_layers + lm_head) * 3
  return StepFlops(weights=float(weights), attention=float(attention * cfg.n_layers * 3))


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token at sequence length ``seq_len``."""
  return training_flops(cfg, 1, seq_len).total / seq_len


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown (e.g. CPU)."""
  kind = device_kind.lower()
  for name, peak in PEAK_BF16_FLOPS:
    if name in kind:
      return peak
  return None


def mfu(step_flops: float, step_seconds: float, n_devices: int, device_kind: str) -> float | None:
  """Model FLOPs utilisation of a step over ``n_devices`` devices; None without a known peak."""
  peak = peak_flops(device_kind)
  if peak is None or step_seconds <= 0:
    return None
  return step_flops / step_seconds / (n_devices * peak)
