"""Random tiny HF ``LlamaForCausalLM`` models in PyTorch: the reference every parity test uses."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from astrollama_jax.model.config import LlamaConfig, get_config


def make_hf_model(cfg: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
  """A float32 random LlamaForCausalLM with our config's shapes (weights ~ N(0, 0.02), norms perturbed)."""
  torch.manual_seed(seed)
  hf_cfg = transformers.LlamaConfig(
    **{
      k: v
      for k, v in cfg.to_hf_config().items()
      if k not in ("architectures", "model_type", "torch_dtype")
    }
  )
  model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # make the norm weights matter
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model.config.attn_implementation = "eager"
  return model


def save_hf_model(
  cfg: LlamaConfig, folder, seed: int = 0, **save_kw
) -> transformers.LlamaForCausalLM:
  model = make_hf_model(cfg, seed)
  model.save_pretrained(str(folder), **save_kw)
  return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    out = model(
      input_ids=torch.as_tensor(ids, dtype=torch.long),
      attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask),
    )
  return out.logits.float().numpy()


TINY = get_config("tiny", compute_dtype="float32")
TINY_GQA = get_config("tiny_gqa", compute_dtype="float32")
