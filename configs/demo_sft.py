"""The demo's chat SFT: the demo CPT model fine-tuned on data/demo_chat through the same trainer.

    python -m astrollama_jax.train --config=configs/demo_sft.py --workdir=/tmp/astro_demo/sft \
        --config.init_checkpoint=/tmp/astro_demo/cpt \
        --config.data.tokenizer_path=../shared/data/tokenizer/llama2/tokenizer.model

``init_checkpoint`` is the CPT workdir (its latest step; the architecture comes from there).
Conversations are packed into rows with the loss on the assistant's replies only. The demo set
is too small to hold conversations out, so there is no validation split (``eval_sources``).
"""

from astrollama_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.mesh = (1, -1, 1)
  c.init_checkpoint = "/tmp/astro_demo/cpt"
  c.model.compute_dtype = "float32"

  c.data.kind = "sft"
  c.data.sources = [dict(path="data/demo_chat/astro_chat.jsonl", format="sharegpt", count=None, weight=None)]
  c.data.eval_sources = []
  c.data.seq_len = 256
  c.data.seed = 0

  t = c.train
  t.global_batch_size = 4
  t.num_steps = 120
  t.learning_rate = 1e-3
  t.warmup_ratio = 0.1
  t.end_lr_ratio = 0.1
  t.loss_chunk_size = 64
  t.log_every = 10
  t.eval_every = 0
  t.checkpoint_every = 40
  t.keep_checkpoints = 2
  return c
