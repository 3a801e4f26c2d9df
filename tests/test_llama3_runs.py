"""The AstroSage path on a tiny LLaMA 3.1: Meta download -> CPT -> LoRA chat SFT -> export ->
served, each step checked against its reference (peft for the adapter, transformers'
``apply_chat_template`` and greedy ``generate`` through the ``openai`` client for the server)."""

import os

from helpers_models import write_meta_checkpoint
from helpers_serve import NEW, client, load, running
from helpers_train import records
from hf_reference import hf_logits, make_hf_model
import numpy as np
import pytest
import torch
import transformers

from astrollama_jax.checkpoints import loader
from astrollama_jax.commands.convert import convert
from astrollama_jax.commands.export import export
from astrollama_jax.data import chat_templates
from astrollama_jax.model.config import get_config
from astrollama_jax.train import loop
from astrollama_jax.train.defaults import base_config

L31 = get_config("llama3_1_8b").replace(
  dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, compute_dtype="float32"
)
STEPS = 2


def _config(init: str, workdir_kind: str):
  c = base_config()
  c.init_checkpoint = init
  c.model.compute_dtype = "float32"
  c.data.seq_len = 64
  c.train.global_batch_size, c.train.num_steps = 8, STEPS
  c.schedule.learning_rate, c.schedule.warmup_ratio = 2e-2, 0.0
  c.eval.every, c.eval.at_start, c.eval.at_end = 0, False, False
  c.checkpoint.async_save = False
  c.log.every = 1
  c.data.kind = workdir_kind
  return c


@pytest.fixture(scope="module")
def path(tmp_path_factory, shared_data, demo_corpus):
  """Every stage's output folder, from one Meta LLaMA 3.1-layout download."""
  llama3 = shared_data / "tokenizer" / "llama3"
  if not (llama3 / "tokenizer.model").exists():
    pytest.skip("LLaMA 3 tokenizer not in shared data")
  pytest.importorskip("tiktoken")
  root = tmp_path_factory.mktemp("llama3_path")
  model = make_hf_model(L31, seed=9)
  src = write_meta_checkpoint(
    model, L31, str(root / "meta"), 2, tokenizer_path=str(llama3 / "tokenizer.model"), llama3=True
  )
  base = convert("meta", src, str(root / "base"), show_progress=False)["output"]

  cpt = _config(base, "lm")  # the tokenizer comes with the checkpoint
  cpt.data.lm.path = str(demo_corpus)
  loop.train(cpt, str(root / "cpt"))

  sft = _config(str(root / "cpt"), "sft")
  chats = str(shared_data / "chat" / "sharegpt_dummy.json")
  sft.data.sft.sources = [dict(path=chats, format="sharegpt", count=None, weight=1.0)]
  sft.lora.rank, sft.lora.alpha, sft.lora.targets = 4, 8.0, "q,k,v,o,gate,up,down"
  loop.train(sft, str(root / "sft"))

  cpt_hf = export(str(root / "cpt"), str(root / "cpt_hf"), show_progress=False)["output"]
  chat_hf = export(
    str(root / "sft"),
    str(root / "chat_hf"),
    peft_adapter=str(root / "adapter"),
    show_progress=False,
  )["output"]
  return dict(root=root, cpt=root / "cpt", sft=root / "sft", cpt_hf=cpt_hf, chat_hf=chat_hf)


def test_cpt_packs_llama3_documents_and_sft_records_the_llama3_template(path):
  for stage in ("cpt", "sft"):
    losses = [r["loss"] for r in records(path[stage], "train")]
    assert len(losses) == STEPS and np.isfinite(losses).all(), stage
  # The workdirs carry Meta's tiktoken tokenizer on; SFT chose LLaMA 3's chat format from it.
  assert loader.tokenizer_path(str(path["sft"])).endswith("tokenizer.model")
  assert loader.recorded_chat_template(str(path["sft"])) == "llama3"
  assert loader.recorded_chat_template(path["chat_hf"]) == "llama3"


def test_the_peft_adapter_on_the_cpt_export_equals_the_merged_chat_export(path):
  import peft

  ids = np.random.default_rng(0).integers(0, 128256, (2, 16))
  base = transformers.LlamaForCausalLM.from_pretrained(path["cpt_hf"], dtype=torch.float32)
  adapted = peft.PeftModel.from_pretrained(base, str(path["root"] / "adapter")).eval()
  merged = transformers.LlamaForCausalLM.from_pretrained(path["chat_hf"], dtype=torch.float32)
  plain = transformers.LlamaForCausalLM.from_pretrained(path["cpt_hf"], dtype=torch.float32)
  a, b = hf_logits(adapted, ids), hf_logits(merged.eval(), ids)
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
  assert np.abs(a - hf_logits(plain.eval(), ids)).max() > 1e-3  # the adapters moved the model


def test_served_greedy_chat_equals_transformers_on_the_export(path):
  folder = path["chat_hf"]
  model = load(folder)
  template = chat_templates.choose(recorded=loader.recorded_chat_template(folder))
  assert template is chat_templates.LLAMA3
  msgs = [
    {"role": "system", "content": "You are an astronomer."},
    {"role": "user", "content": "What is a quasar?"},
  ]
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
  ids = list(ids if isinstance(ids, list) else ids["input_ids"])
  stops = hf.generation_config.eos_token_id
  assert sorted(stops) == [128001, 128008, 128009]
  with torch.no_grad():
    out = hf.generate(
      torch.as_tensor([ids]),
      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
      do_sample=False,
      max_new_tokens=NEW,
      pad_token_id=tok.pad_token_id or 128004,
    )
  new = out[0, len(ids) :].tolist()
  cut = next((i for i, t in enumerate(new) if t in stops), len(new))
  with running(model, chat_template=template) as (server, _):
    got = client(server).chat.completions.create(
      model="tiny-chat", messages=msgs, temperature=0, max_tokens=NEW
    )
  assert got.usage.prompt_tokens == len(ids)
  assert got.usage.completion_tokens == cut
  assert got.choices[0].message.content == tok.decode(new[:cut], skip_special_tokens=True)
  assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
