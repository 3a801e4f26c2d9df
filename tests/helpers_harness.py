"""The harness tests' model folders, task data and extra task YAMLs."""

from __future__ import annotations

from helpers import write_jsonl
from helpers_models import make_hf_folder
import torch
import yaml

from astrollama_jax.formats.hf_tokenizer import write_hf_tokenizer_files

STOP = ["e", "\n"]


def mcq_records(abstracts, letters=True):
  """Questions made of abstract words; the answer a letter, or (``letters=False``) an index."""
  out = []
  for i, a in enumerate(abstracts[:5]):
    w = a.split()
    out.append(
      {
        "question": " ".join(w[:10]) + "?",
        "A": w[10],
        "B": " ".join(w[11:13]),
        "C": w[13],
        "D": w[14],
        "answer": "ABCD"[i % 4] if letters else i % 4,
      }
    )
  return out


def greedy_docs(model, tok, abstracts):
  """Half the targets are the model's own greedy continuation (is_greedy true), half not."""
  docs = []
  for i, a in enumerate(abstracts[20:24]):
    prompt = " ".join(a.split()[:8])
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=3, do_sample=False)
    greedy = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    docs.append({"prompt": prompt, "target": greedy if i % 2 == 0 else a.split()[8]})
  return docs


def write_setup(root, cfg, tokenizer_path, abstracts):
  """Root folder with hf/ (model + tokenizer), astro_eval/ (the shipped tasks' data) and
  tasks/ (two more YAMLs)."""
  import transformers

  model = make_hf_folder(cfg, root / "hf", seed=5)
  write_hf_tokenizer_files(root / "hf", tokenizer_path, cfg.max_seq_len)
  tok = transformers.AutoTokenizer.from_pretrained(str(root / "hf"))
  data = root / "astro_eval"
  data.mkdir()
  write_jsonl(data / "astro_mcq.jsonl", mcq_records(abstracts))
  # "abstract" for some records and "text" for others: both fields the eval formats accept
  write_jsonl(
    data / "astro_ph_abstracts.jsonl",
    [{"abstract": a} if i % 2 else {"text": a} for i, a in enumerate(abstracts[5:10])],
  )
  write_jsonl(data / "greedy.jsonl", greedy_docs(model, tok, abstracts))
  write_jsonl(
    data / "complete.jsonl",
    [{"prompt": " ".join(a.split()[:12]), "target": a} for a in abstracts[30:35]],
  )
  tasks = root / "tasks"
  tasks.mkdir()
  common = {"dataset_path": "json", "test_split": "test", "doc_to_text": "{{ prompt }}"}
  (tasks / "astro_greedy.yaml").write_text(
    yaml.safe_dump(
      {
        **common,
        "task": "astro_greedy",
        "output_type": "loglikelihood",
        "dataset_kwargs": {"data_files": {"test": str(data / "greedy.jsonl")}},
        "doc_to_target": "{{ target }}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}, {"metric": "perplexity"}],
      }
    )
  )
  (tasks / "astro_complete.yaml").write_text(
    yaml.safe_dump(
      {
        **common,
        "task": "astro_complete",
        "output_type": "generate_until",
        "dataset_kwargs": {"data_files": {"test": str(data / "complete.jsonl")}},
        "doc_to_target": "{{ target }}",
        "generation_kwargs": {"until": STOP, "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}, {"metric": "chrf"}],
      }
    )
  )
  return root
