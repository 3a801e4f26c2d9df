"""The PyTorch reference: transformers' ``LlamaForCausalLM`` (SDPA attention) on the same shapes.

It computes as the JAX side does on every device (``reference_settings``): master weights in
``model.param_dtype``, autocast to ``model.compute_dtype``, fused AdamW where torch has it,
per-layer checkpointing where the config rematerialises. Whatever torch cannot match is listed
by ``mismatches``, and no speed ratio is given then: a ratio against a handicapped reference
says nothing. Run it before JAX starts, which on a GPU claims the device's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from astrollama_jax.perf import timing


def torch_device() -> str:
  """``cuda`` where torch sees a GPU, else ``cpu``."""
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def fused_adamw_available(dev: str) -> bool:
  """Whether this torch has a fused AdamW kernel for ``dev`` (CUDA, and CPU since torch 2.4)."""
  import torch

  try:
    p = torch.nn.Parameter(torch.zeros(2, device=dev))
    p.grad = torch.zeros_like(p)
    torch.optim.AdamW([p], fused=True).step()
  except (RuntimeError, ValueError):
    return False
  return True


def reference_settings(task: str, cfg: Any, fused_adamw: bool) -> dict:
  """What the torch side computes in, from the same config, on any device.

  Weights are kept in ``param_dtype`` (decode: the compute dtype, as the JAX side serves them)
  and the forward and backward run under ``torch.autocast`` to ``compute_dtype`` where the two
  differ; AdamW keeps its moments in the parameters' dtype; ``remat_policy`` full is per-layer
  gradient checkpointing. Anything torch cannot match shows up in ``mismatches``.
  """
  params = cfg.compute_dtype if task == "decode" else cfg.param_dtype
  out = {
    "param_dtype": params,
    "compute_dtype": cfg.compute_dtype,
    "autocast": cfg.compute_dtype if cfg.compute_dtype != params else None,
  }
  if task == "train":
    out.update(
      moments_dtype=params,
      optimizer="torch AdamW fused" if fused_adamw else "torch AdamW per-tensor loop",
      fused_adamw=fused_adamw,
      remat={"none": "none", "full": "full"}.get(cfg.remat_policy, "full (per layer)"),
      gradient_checkpointing=cfg.remat_policy != "none",
    )
  return out


def mismatches(ours: dict, ref: dict) -> list[str]:
  """Where the reference does not compute as the JAX side does (empty: like for like)."""
  out = [
    f"{k}: jax {ours[k]}, torch {ref.get(k)}"
    for k in ("param_dtype", "compute_dtype", "moments_dtype", "remat")
    if k in ours and ours[k] != ref.get(k)
  ]
  if ref.get("autocast") is not None and ref["autocast"] not in ("bfloat16", "float16"):
    out.append(f"autocast: torch cannot autocast up to {ref['autocast']}")
  if ref.get("fused_adamw") is False:
    out.append("optimizer: torch has no fused AdamW on this device")
  return out


def _torch_dtype(name: str):
  import torch

  return getattr(torch, name)


def _torch_model(cfg, param_dtype: str):
  """A random transformers LlamaForCausalLM with our shapes, built directly on the device."""
  import torch
  import transformers

  dev = torch_device()
  hf = {
    k: v
    for k, v in cfg.to_hf_config().items()
    if k not in ("architectures", "model_type", "torch_dtype")
  }
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(
      transformers.LlamaConfig(**hf), dtype=_torch_dtype(param_dtype), attn_implementation="sdpa"
    )
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  return model, dev


def _autocast(dev: str, settings: dict):
  import torch

  dtype = settings["autocast"]
  return torch.autocast(dev, dtype=_torch_dtype(dtype or "bfloat16"), enabled=dtype is not None)


def _torch_sync(dev: str) -> Callable[[Any], None]:
  import torch

  return (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)


def _torch_info(model, dev: str, settings: dict) -> dict:
  import torch
  import transformers

  cuda = dev == "cuda"
  return {
    "impl": "torch",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "attention": "sdpa",
    **settings,
    "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
  }


def torch_train(config: Any, cfg: Any, args: timing.Options, batch: dict) -> dict:
  """The same step in PyTorch: forward with labels, backward, clipping, AdamW (the config's
  ``optimizer`` and peak learning rate), computing as ``reference_settings`` says."""
  import torch

  dev = torch_device()
  settings = reference_settings("train", cfg, fused_adamw_available(dev))
  model, dev = _torch_model(cfg, settings["param_dtype"])
  model.train()
  if settings["gradient_checkpointing"]:
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
  o, micro = config.optimizer, config.train.grad_accum_steps
  opt = torch.optim.AdamW(
    model.parameters(),
    lr=config.schedule.learning_rate,
    betas=(o.adam_b1, o.adam_b2),
    eps=o.adam_eps,
    weight_decay=o.weight_decay,
    fused=settings["fused_adamw"] or None,
  )
  ids = torch.as_tensor(batch["tokens"], dtype=torch.long, device=dev)

  def step():
    for chunk in ids.chunk(micro):
      with _autocast(dev, settings):
        loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss / micro
      loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  out = timing.time_calls(step, args.steps, args.warmup, _torch_sync(dev))
  return {**out, **_torch_info(model, dev, settings)}


def torch_params(model: Any, cfg: Any) -> dict:
  """The torch model's weights as our (numpy) parameter tree, in our dtype of its weights."""
  import ml_dtypes  # noqa: F401  (numpy learns bfloat16)
  import numpy as np

  from astrollama_jax.formats import mapping

  state = model.state_dict()
  dtype = str(next(model.parameters()).dtype).replace("torch.", "")

  def read(entry, shape):
    del shape
    for name in entry.hf_names(cfg.n_layers):
      yield state[name].float().cpu().numpy()

  params: dict = {}
  for path, arr in mapping.stack_params(cfg, read, np.dtype(dtype).name):
    mapping.set_path(params, path, arr)
  return params


def torch_decode(cfg: Any, args: timing.Options, prompts: list[list[int]]) -> tuple[dict, dict]:
  """transformers' greedy ``generate`` (dynamic KV cache), exactly ``new_tokens`` a row, with
  weights in the compute dtype; returns (result, its weights as our parameters), so that the
  JAX side can decode the same weights and the two sides' tokens can be compared."""
  import torch

  settings = reference_settings("decode", cfg, False)
  model, dev = _torch_model(cfg, settings["param_dtype"])
  model.eval()
  ids = torch.as_tensor(prompts, dtype=torch.long, device=dev)
  holder = {}

  def run(n):
    def call():
      with torch.no_grad(), _autocast(dev, settings):
        holder["out"] = model.generate(
          input_ids=ids,
          attention_mask=torch.ones_like(ids),
          do_sample=False,
          max_new_tokens=n,
          min_new_tokens=n,
          pad_token_id=0,
        )
      return holder["out"]

    return call

  full = timing.time_calls(run(args.new_tokens), args.steps, args.warmup, _torch_sync(dev))
  tokens = holder["out"][:, ids.shape[1] :].tolist()
  first = timing.time_calls(run(1), args.steps, 1, _torch_sync(dev))
  result = {
    **timing.decode_rates(full["median_s"], first["median_s"], len(prompts), args.new_tokens),
    "warmup_s": full["warmup_s"],
    **_torch_info(model, dev, settings),
    "tokens": tokens,
  }
  return result, torch_params(model, cfg)
