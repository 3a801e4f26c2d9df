"""Chat SFT of the astro-ph CPT model: the AstroLLaMA-Chat mixture and schedule.

    --config=configs/astro_chat_sft.py        # 7B  (lr 2e-5)
    --config=configs/astro_chat_sft.py:70b    # 70B (lr 3e-7, as in the 70B sibling)

Data: 10,356 QA dialogues generated from abstracts (``python -m astrollama_jax make_qa``) + all of
LIMA + 10,000 OpenOrca + 10,000 UltraChat, mixed by
``astrollama_jax.data.chat_dataset.mix_sources`` and
fed by ``make_sft_dataset``. Paths are placeholders: point them at your local copies.
Batch 48 x 2048 tokens, cosine schedule with 3% warmup, one epoch (the defaults otherwise).
"""

from astrollama_jax.train.defaults import base_config

# Meshes as planned by ``python -m astrollama_jax aot`` (see docs/benchmarks.md): 8 GPUs for 7B
# (~34 GB per device), 64 for 70B (~42 GB per device), both with full remat and a chunked loss.
SIZES = {
  "7b": dict(preset="llama2_7b", learning_rate=2e-5, mesh=(1, 8, 1)),
  "70b": dict(preset="llama2_70b", learning_rate=3e-7, mesh=(1, 16, 4)),
}


def get_config(size: str = "7b"):
  if size not in SIZES:
    raise ValueError(f"astro_chat_sft: unknown size {size!r}; expected one of {sorted(SIZES)}")
  s = SIZES[size]
  c = base_config()
  c.mesh = s["mesh"]
  c.model.preset = s["preset"]
  c.model.remat_policy = "full"
  c.model.attention_impl = "auto"  # splash on TPU, cuDNN on GPU, XLA on CPU (model/attention.py)
  # The continual-pre-training result this SFT starts from (anything checkpoints.load_model reads).
  c.init_checkpoint = f"runs/astro_cpt_{size}"

  c.data.kind = "sft"
  c.data.tokenizer_path = "data/tokenizer/llama2/tokenizer.model"
  # Each source: path, format (auto|sharegpt|openai|ultrachat|openorca|lima|lmflow), and either
  # count (exactly this many, sampled without replacement) or weight (x the file's size) or
  # neither (all of it). The recipe holds none out: add eval_sources to get an eval loss.
  c.data.sft.sources = [
    dict(path="data/chat/astro_qa_abstracts.jsonl", format="sharegpt", count=10_356, weight=None),
    dict(path="data/chat/lima_train.jsonl", format="lima", count=None, weight=None),
    dict(path="data/chat/openorca.jsonl", format="openorca", count=10_000, weight=None),
    dict(path="data/chat/ultrachat.jsonl", format="ultrachat", count=10_000, weight=None),
  ]

  c.train.global_batch_size = 48  # packed rows of seq_len tokens
  c.schedule.learning_rate = s["learning_rate"]
  c.loss.chunk_size = 512  # never materialise float32 logits for the whole 2048 x 32000
  return c
