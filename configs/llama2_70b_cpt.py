"""LLaMA-2-70B continual pre-training on astro-ph (the AstroLLaMA recipe at 70B).

    launch/slurm_gpu.sbatch configs/llama2_70b_cpt.py runs/astro_cpt_70b \
        --config.init_checkpoint=ckpt/llama2_70b --config.data.path=data/astro_corpus \
        --config.data.tokenizer_path=ckpt/llama2_70b/tokenizer.model

Recipe: lr 2e-5, cosine, warmup ratio 0.03, 2048 tokens, global batch 160, one epoch.
Mesh: 64 x 80 GB GPUs (8 hosts of 8) as FSDP 32 x tensor 2 (tensor parallelism inside a host's
NVLink domain). 160 rows = 5 micro-batches of 32, one row per FSDP group per micro-batch;
full rematerialisation, chunked LM-head loss. Float32 master weights and Adam moments alone are
69e9 x 12 B = 830 GB, 13 GB per device over 64; the AOT plan (docs/benchmarks.md, "Scale") puts
the whole step at ~32 GB per device. The smallest layout that fits 80 GB is 32 devices as
--config.mesh='(1,32,1)' (~56 GB planned); 16 devices do not fit (~99 GB).
"""

from astrollama_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.mesh = (1, 32, 2)
  c.model.preset = "llama2_70b"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.model.attention_impl = "cudnn"
  c.init_checkpoint = ""

  c.data.kind = "lm"
  c.data.path = ""
  c.data.tokenizer_path = ""
  c.data.seq_len = 2048
  c.data.worker_count = 8

  t = c.train
  t.global_batch_size = 160
  t.grad_accum_steps = 5
  t.num_steps = 0
  t.num_epochs = 1
  t.learning_rate = 2e-5
  t.lr_schedule = "cosine"
  t.warmup_ratio = 0.03
  t.end_lr_ratio = 0.0
  t.loss_chunk_size = 512
  t.log_every = 10
  t.eval_every = 200
  t.eval_batches = 20
  t.checkpoint_every = 100
  t.keep_checkpoints = 2
  return c
