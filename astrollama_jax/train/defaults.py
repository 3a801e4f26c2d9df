"""The training config schema, with defaults; ``configs/*.py`` start from ``base_config()``.

Every key a run reads is here, so a typo in ``--config.schedule.lerning_rate=...`` fails at
parse time instead of being ignored. The defaults are the reference recipe (LLaMA-2-7B, 160 x
2048 tokens, lr 2e-5 cosine with 3% warmup, one epoch); a config states only what differs.
One section per concern:

* ``model``: ``preset`` (``model/config.py``) plus every ``LlamaConfig`` field: the architecture
  fields are placeholders (None keeps the preset's or the checkpoint's value), the execution
  policy (dtypes, remat, attention) always applies, also on top of a loaded checkpoint;
* ``init_checkpoint``: '' for a random init, else anything ``checkpoints.loader.load_model`` reads
  (HF folder, converted DIR, WORKDIR, step folder); its architecture wins over ``model.preset``;
* ``mesh``: (data, fsdp, tensor), one entry may be -1; ``sharding_rules``: logical axis -> mesh
  axes ('data,fsdp'; '' = replicated), for parameters and activations alike;
* ``data``: ``kind`` (lm | sft | synthetic: ``train/data.py DATA_KINDS``), what every kind
  shares (``seq_len``, ``seed``, ``shuffle``, ``tokenizer_path``) and one sub-section per kind
  (``data.lm``, ``data.sft``, ``data.synthetic``), read only when ``kind`` names it;
* ``train``: how long and how big (steps or epochs, global batch, micro-batches), and when to
  give up on non-finite steps;
* ``optimizer`` (AdamW, clipping, moments dtype), ``schedule`` (peak learning rate and shape),
  ``loss``, ``eval``, ``checkpoint``, ``log`` (metrics, optional W&B);
* ``lora``: ``rank`` > 0 trains low-rank adapters over the frozen ``init_checkpoint`` (CPT and
  SFT alike; ``model/lora.py``): ``alpha`` (scaling alpha / rank, as peft), ``dropout`` (on the
  adapters' input, training only), ``targets`` (comma-separated, of q, k, v, o, gate, up, down),
  ``base_dtype`` (the frozen weights' dtype; bfloat16 halves their memory).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from astrollama_jax import sharding
from astrollama_jax.model.config import POLICY_FIELDS, LlamaConfig


def _section(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def model_section() -> ml_collections.ConfigDict:
  """``preset`` plus one entry per ``LlamaConfig`` field (read from the dataclass itself)."""
  m = _section(preset="llama2_7b")
  for f in dataclasses.fields(LlamaConfig):
    m[f.name] = f.default if f.name in POLICY_FIELDS else placeholder(type(f.default))
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_checkpoint = ""
  c.mesh = (1, -1, 1)
  c.sharding_rules = _section(**sharding.rules_to_config())
  c.model = model_section()

  c.data = _section(
    kind="lm",
    seq_len=2048,
    seed=0,
    shuffle=True,
    tokenizer_path="",  # lm and sft: SentencePiece tokenizer.model
    # lm and sft: virtual data shards, fixed for the run (0: one per row of the global batch);
    # a checkpoint resumes on any process count that divides them
    shards=0,
    lm=_section(
      path="",  # the --output of `python -m astrollama_jax prepare`
      # weights of record sets: sections {"abstract": 0.5, ...}, or with date bounds
      # {"since:2024-06-01": 0.7, "abstract until:2024-05-31": 0.3}; {} = all
      mixture={},
      worker_count=0,  # Grain worker processes
    ),
    # sources: list of {path, format, count, weight}; eval_sources: validation conversations;
    # chat_template: the chat format, a name in data/chat_templates.py TEMPLATES; "" = the
    # tokenizer's family's (llama3 for a LLaMA 3 tokenizer, else llama2). The name used is
    # recorded in the workdir's config.json, where chat, serve and export find it.
    sft=_section(sources=[], eval_sources=[], chat_template=""),
    synthetic=_section(
      num_rows=4096,  # rows per epoch
      stall_after_steps=0,  # > 0: hangs after this many batches (tests)
    ),
  )

  c.train = _section(
    global_batch_size=160,  # sequences per optimizer step, over all processes
    num_steps=0,  # > 0: exactly this many steps; 0: num_epochs epochs
    num_epochs=1,
    grad_accum_steps=1,  # micro-batches per step (global batch / this = micro batch)
    max_consecutive_nonfinite=20,  # stop after this many skipped steps in a row
    hang_timeout_s=0.0,  # > 0: no step/eval/checkpoint progress this long -> exit 76
  )
  c.optimizer = _section(
    weight_decay=0.0,  # HF Trainer default, as in the reference recipe
    adam_b1=0.9,
    adam_b2=0.95,
    adam_eps=1e-8,
    grad_clip_norm=1.0,
    moments_dtype="float32",  # or bfloat16 (Adam mu and nu)
  )
  c.schedule = _section(
    learning_rate=2e-5,  # the peak
    kind="cosine",  # cosine | constant
    warmup_ratio=0.03,
    end_lr_ratio=0.0,
  )
  c.loss = _section(chunk_size=0)  # > 0: LM head + cross-entropy in sequence chunks
  c.eval = _section(
    every=500,  # 0: only at the start and the end
    batches=0,  # 0: the whole validation split
    batch_size=0,  # 0: global_batch_size / grad_accum_steps
    at_start=True,
    at_end=True,
  )
  c.checkpoint = _section(every=500, keep=3, async_save=True)
  c.lora = _section(
    rank=0,  # 0: full fine-tuning; > 0: adapters of this rank
    alpha=16.0,
    dropout=0.0,
    targets="q,v",  # comma-separated, of q, k, v, o, gate, up, down
    base_dtype="bfloat16",
  )
  c.log = _section(
    every=10,
    batch_hashes=False,  # write every step's batch digest to metrics.jsonl
    # Weights & Biases (the optional `wandb` extra): off by default; the run id is kept in the
    # workdir, so a resumed run continues the same W&B run. name '' = the workdir's name.
    wandb=False,
    wandb_project="astrollama-jax",
    wandb_name="",
  )
  return c
