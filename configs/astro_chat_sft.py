"""Chat SFT of the astro-ph CPT model: the AstroLLaMA-Chat mixture and schedule.

    --config=configs/astro_chat_sft.py        # 7B  (lr 2e-5)
    --config=configs/astro_chat_sft.py:70b    # 70B (lr 3e-7, as in the 70B sibling)
    --config=configs/astro_chat_sft.py:3.1-8b   # LLaMA 3.1 8B after configs/llama3_cpt.py:8b
    --config=configs/astro_chat_sft.py:3.1-70b  # LLaMA 3.1 70B after configs/llama3_cpt.py:70b

Data: 10,356 QA dialogues generated from abstracts (``python -m astrollama_jax make_qa``) + all of
LIMA + 10,000 OpenOrca + 10,000 UltraChat, mixed by
``astrollama_jax.data.chat_dataset.mix_sources`` and
fed by ``make_sft_dataset``. Paths are placeholders: point them at your local copies.
Batch 48 x 2048 tokens, cosine schedule with 3% warmup, one epoch (the defaults otherwise).

LLaMA 3.1 (AstroSage's base): the same mixture and schedule (AstroSage's own SFT data and
numbers are not restated), rendered in LLaMA 3's chat format, which the tokenizer that comes
with the CPT checkpoint selects (``data.sft.chat_template`` left to the tokenizer's family);
AstroSage then merges the result with Meta's Instruct model (``python -m astrollama_jax merge``,
75% / 25%).
"""

from astrollama_jax.train.defaults import base_config

# Meshes as planned by ``python -m astrollama_jax aot`` (see docs/benchmarks.md): 8 GPUs for 7B
# (~34 GB per device), 64 for 70B (~42 GB per device), both with full remat and a chunked loss.
SIZES = {
  "7b": dict(preset="llama2_7b", learning_rate=2e-5, mesh=(1, 8, 1), cpt="astro_cpt_7b"),
  "70b": dict(preset="llama2_70b", learning_rate=3e-7, mesh=(1, 16, 4), cpt="astro_cpt_70b"),
  "3.1-8b": dict(preset="llama3_1_8b", learning_rate=2e-5, mesh=(1, 8, 1), cpt="astro_cpt_l3_8b"),
  "3.1-70b": dict(
    preset="llama3_1_70b", learning_rate=3e-7, mesh=(1, 16, 4), cpt="astro_cpt_l3_70b"
  ),
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
  c.init_checkpoint = f"runs/{s['cpt']}"

  c.data.kind = "sft"
  if s["preset"].startswith("llama2"):  # LLaMA 3's comes with its checkpoint
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
