"""The embedded demo: a tiny LLaMA continues pre-training on data/demo_corpus on a CPU.

    python -m astrollama_jax.prepare --source=data/demo_corpus --output=/tmp/astro_demo/corpus \
        --validation_fraction=0.15
    python -m astrollama_jax.train --config=configs/demo.py --workdir=/tmp/astro_demo/cpt \
        --config.data.path=/tmp/astro_demo/corpus \
        --config.data.tokenizer_path=../shared/data/tokenizer/llama2/tokenizer.model

(``python -m astrollama_jax.demo`` does all of it.) The ``demo`` preset is shrunk to 2 layers of
width 128 so the whole demo takes about two and a half minutes on two idle cores; the 32,000-piece vocabulary stays, so
the real LLaMA-2 tokenizer and HF export work unchanged. float32 compute: bfloat16 is slow on CPU.
"""

from astrollama_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.mesh = (1, -1, 1)
  c.model.preset = "demo"
  c.model.dim = 128
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.ffn_dim = 384
  c.model.compute_dtype = "float32"

  c.data.kind = "lm"
  c.data.path = "/tmp/astro_demo/corpus"
  c.data.seq_len = 128
  c.data.seed = 0

  t = c.train
  t.global_batch_size = 8
  t.num_steps = 120
  t.learning_rate = 3e-3
  t.warmup_ratio = 0.05
  t.end_lr_ratio = 0.1
  t.weight_decay = 0.0
  t.grad_clip_norm = 1.0
  t.loss_chunk_size = 32
  t.log_every = 10
  t.eval_every = 40
  t.eval_batch_size = 8
  t.checkpoint_every = 40
  t.keep_checkpoints = 2
  return c
