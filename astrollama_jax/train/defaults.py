"""The training config schema, with defaults; ``configs/*.py`` start from ``base_config()``.

Every key a run reads is here, so a typo in ``--config.train.lerning_rate=...`` fails at parse
time instead of being ignored. Sections:

* ``model``: ``preset`` (``model/config.py``) plus optional LlamaConfig field overrides
  (placeholders: None keeps the preset's or the checkpoint's value);
* ``init_checkpoint``: '' for a random init, else anything ``checkpoints.load_model`` reads
  (HF folder, converted DIR, WORKDIR, step folder); its architecture wins over ``model.preset``;
* ``mesh``: (data, fsdp, tensor), one entry may be -1;
* ``data``: ``kind`` (lm | sft | synthetic) and what that kind needs;
* ``train``: length, batch, optimizer, loss, logging, evaluation and checkpoint cadence.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_checkpoint = ""
  c.mesh = (1, -1, 1)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "demo"
  for name, kind in (("vocab_size", int), ("dim", int), ("n_layers", int), ("n_heads", int),
                     ("n_kv_heads", int), ("ffn_dim", int), ("max_seq_len", int),
                     ("norm_eps", float), ("rope_theta", float)):
    c.model[name] = placeholder(kind)
  # Execution policy (always applied, also on top of a loaded checkpoint).
  c.model.param_dtype = "float32"     # master weights
  c.model.compute_dtype = "bfloat16"
  c.model.remat_policy = "none"
  c.model.attention_impl = "xla"

  c.data = ml_collections.ConfigDict()
  c.data.kind = "lm"                  # lm | sft | synthetic
  c.data.path = ""                    # lm: the --output of `python -m astrollama_jax.prepare`
  c.data.tokenizer_path = ""
  c.data.sources = []                 # sft: list of {path, format, count, weight}
  c.data.eval_sources = []            # sft: validation conversations (optional)
  c.data.seq_len = 2048
  c.data.seed = 0
  c.data.shuffle = True
  c.data.mixture = {}                 # lm: section weights, e.g. {"abstract": 0.5, ...}; {} = all
  c.data.worker_count = 0             # lm: Grain worker processes
  c.data.num_rows = 4096              # synthetic: rows per epoch
  c.data.stall_after_steps = 0        # synthetic: > 0 hangs after this many batches (tests)

  t = c.train = ml_collections.ConfigDict()
  t.global_batch_size = 160           # sequences per optimizer step, over all processes
  t.num_steps = 0                     # > 0: exactly this many steps; 0: num_epochs epochs
  t.num_epochs = 1
  t.grad_accum_steps = 1              # micro-batches per step (global batch / this = micro batch)
  t.learning_rate = 2e-5
  t.lr_schedule = "cosine"            # cosine | constant
  t.warmup_ratio = 0.03
  t.end_lr_ratio = 0.0
  t.weight_decay = 0.0                # HF Trainer default, as in the reference recipe
  t.adam_b1 = 0.9
  t.adam_b2 = 0.95
  t.adam_eps = 1e-8
  t.grad_clip_norm = 1.0
  t.moments_dtype = "float32"         # or bfloat16 (Adam mu and nu)
  t.loss_chunk_size = 0               # > 0: LM head + cross-entropy in sequence chunks of this size
  t.max_consecutive_nonfinite = 20    # stop after this many skipped steps in a row
  t.log_every = 10
  t.log_batch_hashes = False          # write every step's batch digest to metrics.jsonl
  t.eval_every = 500                  # 0: only at the start and the end
  t.eval_batches = 0                  # 0: the whole validation split
  t.eval_batch_size = 0               # 0: global_batch_size / grad_accum_steps
  t.eval_at_start = True
  t.eval_at_end = True
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.async_checkpointing = True
  t.hang_timeout_s = 0.0              # > 0: no step/eval/checkpoint progress this long -> exit 76
  return c
