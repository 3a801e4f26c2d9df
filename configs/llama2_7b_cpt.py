"""LLaMA-2-7B continual pre-training on astro-ph (the AstroLLaMA recipe).

    python -m astrollama_jax.train --config=configs/llama2_7b_cpt.py --workdir=runs/astro_cpt_7b \
        --config.init_checkpoint=ckpt/llama2_7b --config.data.path=data/astro_corpus \
        --config.data.tokenizer_path=ckpt/llama2_7b/tokenizer.model

Recipe (docs/DESIGN.md): lr 2e-5, cosine, warmup ratio 0.03, 2048 tokens, global batch 160,
one epoch. Mesh: one 8 x 80 GB host, fully sharded (FSDP 8). 160 rows = 4 micro-batches of 40
(5 rows per device per micro-batch), full rematerialisation and the chunked LM-head loss: ~34 GB
per device in the AOT memory plan (docs/benchmarks.md, "Scale"); 4 devices also fit (~67 GB).
On more hosts put the extra factor on ``data`` (e.g. mesh (2, 8, 1) on 16 GPUs, grad_accum 2).
"""

from astrollama_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.mesh = (1, 8, 1)
  c.model.preset = "llama2_7b"
  c.model.param_dtype = "float32"     # master weights
  c.model.compute_dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.model.attention_impl = "cudnn"    # flash attention on H100/A100; use "xla" on TPU/CPU
  c.init_checkpoint = ""              # a converted DIR or HF folder of LLaMA-2-7B

  c.data.kind = "lm"
  c.data.path = ""
  c.data.tokenizer_path = ""
  c.data.seq_len = 2048
  c.data.worker_count = 8

  t = c.train
  t.global_batch_size = 160
  t.grad_accum_steps = 4
  t.num_steps = 0                     # one epoch of the corpus (counted at start-up)
  t.num_epochs = 1
  t.learning_rate = 2e-5
  t.lr_schedule = "cosine"
  t.warmup_ratio = 0.03
  t.end_lr_ratio = 0.0
  t.loss_chunk_size = 512
  t.log_every = 10
  t.eval_every = 200
  t.eval_batches = 50
  t.checkpoint_every = 200
  t.keep_checkpoints = 3
  return c
