"""The demo's chat SFT: the demo CPT model fine-tuned on data/demo_chat through the same trainer.

    python -m astrollama_jax train --config=configs/demo_sft.py --workdir=DEMO/sft \
        --config.init_checkpoint=DEMO/cpt [--config.data.tokenizer_path=TOKENIZER]

``init_checkpoint`` is the CPT workdir (its latest step; the architecture and the tokenizer come
from there); it has no default: ``--config.init_checkpoint=`` fine-tunes a random ``demo`` model.
Conversations are packed into rows with the loss on the assistant's replies only. The demo set
is too small to hold conversations out, so there is no validation split (``data.sft.eval_sources``).
"""

from ml_collections.config_dict import placeholder

from astrollama_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.init_checkpoint = placeholder(str)
  c.model.preset = "demo"
  c.model.compute_dtype = "float32"

  c.data.kind = "sft"
  c.data.seq_len = 256
  c.data.sft.sources = [
    dict(path="data/demo_chat/astro_chat.jsonl", format="sharegpt", count=None, weight=None)
  ]

  c.train.global_batch_size = 4
  c.train.num_steps = 120
  c.schedule.learning_rate = 1e-3
  c.schedule.warmup_ratio = 0.1
  c.schedule.end_lr_ratio = 0.1
  c.loss.chunk_size = 64
  c.eval.every = 0
  c.checkpoint.every = 40
  c.checkpoint.keep = 2
  return c
