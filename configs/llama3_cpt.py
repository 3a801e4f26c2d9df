"""LLaMA 3.1 continual pre-training on astro-ph: AstroSage's base at 8B and 70B.

    python -m astrollama_jax convert --source_format=meta --source=Meta-Llama-3.1-8B \
        --output=ckpt/llama3_1_8b            # params.json, consolidated.00.pth, tokenizer.model
    python -m astrollama_jax train --config=configs/llama3_cpt.py:8b \
        --workdir=runs/astro_cpt_l3_8b --config.init_checkpoint=ckpt/llama3_1_8b \
        --config.data.lm.path=data/astro_corpus
    launch/slurm_gpu.sbatch configs/llama3_cpt.py:70b runs/astro_cpt_l3_70b \
        --config.init_checkpoint=ckpt/llama3_1_70b --config.data.lm.path=data/astro_corpus

The tokenizer comes with the checkpoint (Meta's tiktoken ``tokenizer.model``); documents are
packed between ``<|begin_of_text|>`` and ``<|end_of_text|>`` as LLaMA 3's pre-training did.

Recipe. From AstroSage (AstroMLab 3, arXiv 2411.09012, and the AstroSage-70B model card):
LLaMA 3.1 as the base and 8,192-token sequences. AstroSage's learning rate and batch are not
restated here; the rest is the AstroLLaMA recipe (``train/defaults.py``): lr 2e-5, cosine with
3% warmup, one epoch, and its tokens per step: 40 rows of 8,192 = 160 of 2,048 = 327,680.
Full rematerialisation and the platform's fused attention as for LLaMA-2; the loss in chunks of
256 positions, since the 128,256-entry vocabulary makes each position's float32 logits 0.5 MB.

* 8b: one 8 x 80 GB host, FSDP 8, 5 micro-batches of 8 rows (one per device); on a v5p-8 slice
  ``--config.mesh='(1,-1,1)'`` (two rows per chip). Plans in docs/benchmarks.md.
* 70b: 64 x 80 GB GPUs as FSDP 32 x tensor 2; 32 rows (one per FSDP group) per step: 40 rows
  cannot be split over 32 batch shards, so the step holds 262,144 tokens.
"""

import importlib.util
import os

# What differs from configs/llama2_cpt.py (which gives the rest: remat, fused attention, data
# workers, evaluation and checkpoint cadence).
SIZES = {
  "8b": dict(
    llama2="7b",
    preset="llama3_1_8b",
    mesh=(1, 8, 1),
    global_batch_size=40,
    grad_accum_steps=5,
  ),
  "70b": dict(
    llama2="70b",
    preset="llama3_1_70b",
    mesh=(1, 32, 2),
    global_batch_size=32,
    grad_accum_steps=1,
  ),
}


def _llama2_config(size: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama2_cpt.py")
  spec = importlib.util.spec_from_file_location("llama2_cpt", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(size)


def get_config(size: str = "8b"):
  if size not in SIZES:
    raise ValueError(f"llama3_cpt: unknown size {size!r}; expected one of {sorted(SIZES)}")
  s = SIZES[size]
  c = _llama2_config(s["llama2"])
  c.mesh = s["mesh"]
  c.model.preset = s["preset"]
  c.data.seq_len = 8192
  c.train.global_batch_size = s["global_batch_size"]
  c.train.grad_accum_steps = s["grad_accum_steps"]
  c.loss.chunk_size = 256
  c.eval.batches = 20
  return c
