"""LLaMA-2 continual pre-training on astro-ph: the AstroLLaMA recipe at 7B and 70B.

    python -m astrollama_jax train --config=configs/llama2_cpt.py:7b --workdir=runs/astro_cpt_7b \
        --config.init_checkpoint=ckpt/llama2_7b --config.data.lm.path=data/astro_corpus \
        --config.data.tokenizer_path=ckpt/llama2_7b/tokenizer.model
    launch/slurm_gpu.sbatch configs/llama2_cpt.py:70b runs/astro_cpt_70b \
        --config.init_checkpoint=ckpt/llama2_70b --config.data.lm.path=data/astro_corpus

Recipe (the defaults, ``train/defaults.py``): lr 2e-5, cosine, warmup ratio 0.03, 2048 tokens,
global batch 160, one epoch (counted at start-up); full rematerialisation, chunked LM-head loss,
the platform's fused attention (``auto``: splash on TPU, cuDNN on GPU; the TPU plans in
docs/benchmarks.md need splash for the 7B at 4096 tokens on v5p-8).

* 7b: one 8 x 80 GB host, fully sharded (FSDP 8). 160 rows = 4 micro-batches of 40 (5 rows per
  device per micro-batch): ~34 GB per device in the AOT memory plan (docs/benchmarks.md,
  "Scale"); 4 devices also fit (~67 GB). On more hosts put the extra factor on ``data`` (e.g.
  mesh (2, 8, 1) on 16 GPUs, grad_accum 2).
* 70b: 64 x 80 GB GPUs (8 hosts of 8) as FSDP 32 x tensor 2 (tensor parallelism inside a host's
  NVLink domain). 160 rows = 5 micro-batches of 32, one row per FSDP group per micro-batch.
  Float32 master weights and Adam moments alone are 69e9 x 12 B = 830 GB, 13 GB per device; the
  AOT plan puts the whole step at ~32 GB per device. The smallest layout that fits 80 GB is 32
  devices as --config.mesh='(1,32,1)' (~56 GB planned); 16 devices do not fit (~99 GB).
"""

from astrollama_jax.train.defaults import base_config

SIZES = {
  "7b": dict(
    preset="llama2_7b",
    mesh=(1, 8, 1),
    grad_accum_steps=4,
    eval_batches=50,
    checkpoint_every=200,
    keep=3,
  ),
  "70b": dict(
    preset="llama2_70b",
    mesh=(1, 32, 2),
    grad_accum_steps=5,
    eval_batches=20,
    checkpoint_every=100,
    keep=2,
  ),
}


def get_config(size: str = "7b"):
  if size not in SIZES:
    raise ValueError(f"llama2_cpt: unknown size {size!r}; expected one of {sorted(SIZES)}")
  s = SIZES[size]
  c = base_config()
  c.mesh = s["mesh"]
  c.model.preset = s["preset"]
  c.model.remat_policy = "full"
  c.model.attention_impl = "auto"  # splash on TPU, cuDNN on GPU, XLA on CPU (model/attention.py)
  c.data.lm.worker_count = 8

  c.train.grad_accum_steps = s["grad_accum_steps"]
  c.loss.chunk_size = 512
  c.eval.every = 200
  c.eval.batches = s["eval_batches"]
  c.checkpoint.every = s["checkpoint_every"]
  c.checkpoint.keep = s["keep"]
  return c
