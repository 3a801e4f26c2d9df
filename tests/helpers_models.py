"""Models for the tests: random HF folders, Meta's download layout, torch log-probabilities as
the reference, and the eval command run in this process."""

from __future__ import annotations

import json
import os

from absl import flags
import numpy as np


def make_hf_folder(cfg, folder, seed=1):
  """Save a random tiny LlamaForCausalLM (float32) and return the torch model."""
  from hf_reference import save_hf_model

  return save_hf_model(cfg, folder, seed=seed)


def hf_tensors(folder) -> dict[str, np.ndarray]:
  """Every tensor of an HF folder by name, read with safetensors alone."""
  from safetensors import safe_open

  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(folder, name), "np") as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def run_cli(capsys, *args: str) -> dict:
  """Run ``python -m astrollama_jax eval`` in this process; return its final JSON line.

  The flags live in a private ``FlagValues``, so nothing is defined on absl's global set.
  """
  from astrollama_jax.commands import eval as cli

  fv = flags.FlagValues()
  cli.define_flags(fv)
  argv = fv(["eval", "--noprogress", *args])
  cli.main(argv, fv)
  out = capsys.readouterr().out.strip().splitlines()
  assert out, "the command printed nothing"
  return json.loads(out[-1])


def torch_token_logprobs(model, ids) -> np.ndarray:
  """log p(ids[t] | ids[:t]) for t >= 1 with one plain forward pass (float64 result)."""
  import torch

  with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
  lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
  return lp.numpy()


def torch_logprobs_given(model, context, target) -> np.ndarray:
  """log p(target | context), token by token, from one forward pass over context + target."""
  full = list(context) + list(target)
  return torch_token_logprobs(model, full)[len(context) - 1 :]


# --- Meta's download layout ----------------------------------------------------------------


def _meta_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:  # noqa: F821
  """Undo HF's q/k permutation: half-split rotary rows -> Meta's interleaved pairs."""
  rows, cols = w.shape
  return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(
  model, cfg, folder, mp: int, dtype=None, tokenizer_path=None, llama3=False, output=True
):
  """Meta's download layout: params.json + consolidated.NN.pth, one file per model-parallel rank.

  ``llama3``: LLaMA 3's layout (the embedding split on the vocabulary, ``vocab_size``,
  ``rope_theta`` and ``use_scaled_rope`` in params.json); ``output=False`` leaves out the output
  head (a tied model).
  """
  import torch

  dtype = dtype or torch.float32
  os.makedirs(folder, exist_ok=True)
  sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
  full = {
    "tok_embeddings.weight": (sd["model.embed_tokens.weight"], 0 if llama3 else 1),
    "norm.weight": (sd["model.norm.weight"], None),
  }
  if output:
    full["output.weight"] = (sd["lm_head.weight"], 0)
  for i in range(cfg.n_layers):
    p, m = f"model.layers.{i}.", f"layers.{i}."
    full.update(
      {
        m + "attention.wq.weight": (
          _meta_from_hf(sd[p + "self_attn.q_proj.weight"], cfg.n_heads),
          0,
        ),
        m + "attention.wk.weight": (
          _meta_from_hf(sd[p + "self_attn.k_proj.weight"], cfg.n_kv_heads),
          0,
        ),
        m + "attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
        m + "attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
        m + "feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
        m + "feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
        m + "feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
        m + "attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
        m + "ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
      }
    )
  for rank in range(mp):
    shard = {
      name: (t if axis is None else t.chunk(mp, dim=axis)[rank]).clone()
      for name, (t, axis) in full.items()
    }
    shard["rope.freqs"] = torch.ones(cfg.head_dim // 2, dtype=dtype)
    torch.save(shard, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
  # multiple_of / ffn_dim_multiplier chosen so Meta's formula gives the tiny presets' ffn_dim.
  params = {
    "dim": cfg.dim,
    "n_layers": cfg.n_layers,
    "n_heads": cfg.n_heads,
    "multiple_of": 128,
    "ffn_dim_multiplier": 0.75,
    "norm_eps": cfg.norm_eps,
    "vocab_size": -1,
  }
  if cfg.n_kv_heads != cfg.n_heads:
    params["n_kv_heads"] = cfg.n_kv_heads
  if llama3:
    params.update(vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta)
    params["use_scaled_rope"] = cfg.rope_scaling == "llama3"
  with open(os.path.join(folder, "params.json"), "w") as f:
    json.dump(params, f)
  if tokenizer_path:
    os.symlink(tokenizer_path, os.path.join(folder, "tokenizer.model"))
  return folder
