"""The embedded demo: a tiny LLaMA continues pre-training on data/demo_corpus on a CPU.

    python -m astrollama_jax prepare --source=data/demo_corpus --output=DEMO/corpus \
        --validation_fraction=0.15
    python -m astrollama_jax train --config=configs/demo.py --workdir=DEMO/cpt \
        --config.data.lm.path=DEMO/corpus \
        --config.data.tokenizer_path=DEMO/tokenizer/tokenizer.model

(``python -m astrollama_jax demo`` does all of it, with exactly this config, and first builds
``DEMO/tokenizer/tokenizer.model``, the demo's own tokenizer: ``data/demo_tokenizer.py``.) The
``demo`` model preset (2 layers of width 128) has that tokenizer's 4,096-piece vocabulary; with
LLaMA-2's tokenizer add ``--config.model.vocab_size=32000``. float32 compute: bfloat16 is slow
on CPU.
"""

from astrollama_jax.train.defaults import base_config


def get_config():
  c = base_config()
  c.model.preset = "demo"
  c.model.compute_dtype = "float32"
  c.data.seq_len = 128

  c.train.global_batch_size = 8
  c.train.num_steps = 120
  c.schedule.learning_rate = 3e-3
  c.schedule.warmup_ratio = 0.05
  c.schedule.end_lr_ratio = 0.1
  c.loss.chunk_size = 32
  c.eval.every = 40
  c.eval.batch_size = 8
  c.checkpoint.every = 40
  c.checkpoint.keep = 2
  return c
