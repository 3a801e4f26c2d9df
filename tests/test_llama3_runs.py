"""The AstroSage path on a tiny LLaMA 3.1: Meta download -> CPT -> LoRA chat SFT -> export ->
served, each step checked against its reference (peft for the adapter, transformers'
``apply_chat_template`` and greedy ``generate`` through the ``openai`` client for the server)."""

import json
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


MESSAGES = [
  {"role": "system", "content": "You are an astronomer."},
  {"role": "user", "content": "What is a quasar?"},
]


@pytest.fixture(scope="module")
def hf_answer(path):
  """transformers on the chat export: (prompt ids, greedy answer ids up to an end id, text)."""
  folder = path["chat_hf"]
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
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
  new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
  return ids, new, tok.decode(new, skip_special_tokens=True)


def test_served_greedy_chat_equals_transformers_on_the_export(path, hf_answer):
  folder = path["chat_hf"]
  template = chat_templates.choose(recorded=loader.recorded_chat_template(folder))
  assert template is chat_templates.LLAMA3
  ids, new, text = hf_answer
  with running(load(folder), chat_template=template) as (server, _):
    got = client(server).chat.completions.create(
      model="tiny-chat", messages=MESSAGES, temperature=0, max_tokens=NEW
    )
  assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(new)
  assert got.choices[0].message.content == text
  assert os.path.isfile(os.path.join(folder, "tokenizer.json"))


def test_the_chat_command_answers_as_transformers_on_the_sft_workdir(path, hf_answer):
  """The chat command on the LoRA workdir itself (merged on load, LLaMA 3's format recorded)."""
  import subprocess
  import sys

  from helpers import REPO

  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "chat",
      f"--checkpoint={path['sft']}",
      "--temperature=0",
      f"--max_new_tokens={NEW}",
      "--compute_dtype=float32",
      "--dtype=float32",
      f"--system={MESSAGES[0]['content']}",
    ],
    input=MESSAGES[1]["content"] + "\n/quit\n",
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (
    hf_answer[2] in proc.stdout and json.loads(proc.stdout.strip().splitlines()[-1])["turns"] == 1
  )


def test_eval_perplexity_mcq_and_completion_on_the_llama3_export(path, capsys, abstracts):
  """The eval command on the CPT export: per-document NLL and MCQ letter scores as torch gives
  them with the same LLaMA 3 ids; completions stop at the family's end ids."""
  from helpers import write_jsonl
  from helpers_models import run_cli, torch_logprobs_given, torch_token_logprobs

  from astrollama_jax.data.tokenizer import Tokenizer
  from astrollama_jax.eval import mcq

  folder, root = path["cpt_hf"], path["root"] / "eval"
  root.mkdir()
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  tok = Tokenizer(folder)
  assert tok.bos_id == 128000
  write_jsonl(
    root / "abstracts.jsonl", [{"id": f"a{i}", "abstract": a} for i, a in enumerate(abstracts[:3])]
  )
  questions = [
    {
      "question": " ".join(a.split()[:9]) + "?",
      "A": "a star",
      "B": "a galaxy",
      "C": "dust",
      "D": "a planet",
      "answer": "ABCD"[i],
    }
    for i, a in enumerate(abstracts[3:7])
  ]
  write_jsonl(root / "astro.jsonl", questions)
  # rows of 256 tokens (the default, 2,048 here, is sized for accelerators), two at a time
  common = (
    f"--checkpoint={folder}",
    "--compute_dtype=float32",
    "--batch_size=2",
    "--max_len=256",
    "--mesh=2,1,4",
  )
  ppl = run_cli(
    capsys,
    "--task=perplexity",
    *common,
    f"--output={root / 'ppl'}",
    f"--data={root / 'abstracts.jsonl'}",
    "--max_len=1024",  # each abstract in one window, as the reference scores it
  )
  items = [json.loads(x) for x in open(root / "ppl" / "perplexity_items.jsonl")]
  assert all(it["tokens"] < 1024 for it in items)
  ref = [-torch_token_logprobs(model, tok.encode(a)).sum() for a in abstracts[:3]]
  np.testing.assert_allclose([it["nll_sum"] for it in items], ref, rtol=1e-4)
  assert ppl["metrics"]["ppl"] == pytest.approx(
    np.exp(sum(ref) / sum(it["tokens"] for it in items)), rel=1e-4
  )

  run_cli(
    capsys,
    "--task=mcq",
    "--method=letter",
    *common,
    f"--output={root / 'mcq'}",
    f"--data={root / 'astro.jsonl'}",
  )
  items = [json.loads(x) for x in open(root / "mcq" / "mcq_items.jsonl")]
  letters = mcq.letter_ids(tok, 4)
  for it, q in zip(items, mcq.read_questions(str(root / "astro.jsonl"))):
    ctx = tok.encode(mcq.build_prompt(q, [], mcq.letter_block))
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([ctx])).logits[0, -1].double()
    want = torch.log_softmax(logits, -1)[letters].numpy()
    np.testing.assert_allclose(it["letter"]["scores"], want, rtol=1e-4)

  run_cli(
    capsys,
    "--task=completion",
    *common,
    f"--output={root / 'done'}",
    f"--data={root / 'abstracts.jsonl'}",
    "--max_new_tokens=8",
    "--bootstrap=0",
  )
  samples = [json.loads(x) for x in open(root / "done" / "completion_samples.jsonl")]
  assert [s["id"] for s in samples] == ["a0", "a1", "a2"]
  for s, text in zip(samples, abstracts[:3]):
    assert text.startswith(s["prefix"]) and s["generated_tokens"] <= 8
    rest = tok.encode(text[len(s["prefix"]) :].strip(), bos=False)[:8]
    assert s["tokens"] == len(rest) == 8
    want = -torch_logprobs_given(model, tok.encode(s["prefix"]), rest).sum()
    assert s["continuation_nll"] == pytest.approx(want, rel=1e-4)
