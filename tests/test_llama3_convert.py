"""Meta's LLaMA 3.1 / 3.2 downloads and HF LLaMA 3 folders -> our format -> HF again.

The Meta folders are written from random HF models by ``helpers_models.write_meta_checkpoint``
(its own inverse of HF's q/k permutation and model-parallel split, LLaMA 3's vocabulary-split
embedding, ``use_scaled_rope``), with the real LLaMA 3 tokenizer in Meta's tiktoken layout.
"""

import json
import os

from helpers_models import hf_tensors, write_meta_checkpoint
from hf_reference import hf_logits, make_hf_model
import numpy as np
import pytest
import transformers

from astrollama_jax.checkpoints import loader
from astrollama_jax.commands.convert import convert
from astrollama_jax.commands.export import export
from astrollama_jax.data import chat_templates
from astrollama_jax.data.tokenizer import TIKTOKEN, Tokenizer, detect
from astrollama_jax.model import llama
from astrollama_jax.model.config import LlamaConfig, get_config

# 3.1's shapes and RoPE scaling (factor 8) at a tiny size with the real 128,256-entry vocabulary;
# dim 64 with params.json's multiple_of 128 and ffn_dim_multiplier 0.75 gives ffn_dim 128.
L31 = get_config("llama3_1_8b").replace(
  dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, compute_dtype="float32"
)
# 3.2 1B/3B: tied embeddings and factor 32.
L32 = L31.replace(tie_embeddings=True, rope_factor=32.0)


@pytest.fixture(scope="module")
def llama3_dir(shared_data):
  path = shared_data / "tokenizer" / "llama3"
  if not (path / "tokenizer.model").exists():
    pytest.skip("LLaMA 3 tokenizer not in shared data")
  pytest.importorskip("tiktoken")
  return path


def _arch(cfg: LlamaConfig) -> dict:
  return {k: v for k, v in cfg.to_dict().items() if k not in ("param_dtype", "compute_dtype")}


def _ids(tok: Tokenizer, abstracts, n=2, length=40) -> np.ndarray:
  return np.array([tok.encode(a)[:length] for a in abstracts[:n]], np.int32)


@pytest.fixture(scope="module")
def meta31(tmp_path_factory, llama3_dir):
  """(HF model, converted DIR) of a LLaMA 3.1-layout download over two model-parallel shards."""
  root = tmp_path_factory.mktemp("meta31")
  model = make_hf_model(L31, seed=5)
  src = write_meta_checkpoint(
    model,
    L31,
    str(root / "meta"),
    2,
    tokenizer_path=str(llama3_dir / "tokenizer.model"),
    llama3=True,
  )
  params = json.load(open(os.path.join(src, "params.json")))
  assert params["use_scaled_rope"] is True and params["vocab_size"] == 128256
  summary = convert("meta", src, str(root / "out"), show_progress=False)
  assert summary["shards"] == 2 and summary["parameters"] == L31.num_params()
  return model, summary["output"]


def test_meta_llama3_1_converts_to_the_transformers_model(meta31, abstracts):
  model, out = meta31
  loaded = loader.load_model(out, on_host=True)
  assert _arch(loaded.cfg) == _arch(L31)
  assert LlamaConfig.from_hf_config(model.config.to_dict()).rope_factor == loaded.cfg.rope_factor
  assert detect(out) == (TIKTOKEN, os.path.join(out, "tokenizer.model"))
  tok = loaded.open_tokenizer()
  assert (tok.bos_id, tok.vocab_size) == (128000, 128256)
  ids = _ids(tok, abstracts)
  ours, _ = llama.apply(loaded.cfg.replace(compute_dtype="float32"), loaded.params, ids)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_output", [False, True], ids=["no_output", "output_is_embedding"])
def test_meta_llama3_2_download_is_tied_with_factor_32(
  tmp_path, llama3_dir, abstracts, with_output
):
  model = make_hf_model(L32, seed=6)
  src = write_meta_checkpoint(
    model,
    L32,
    str(tmp_path / "meta"),
    1,
    tokenizer_path=str(llama3_dir / "tokenizer.model"),
    llama3=True,
    output=with_output,
  )
  out = convert("meta", src, str(tmp_path / "out"), show_progress=False)["output"]
  loaded = loader.load_model(out, on_host=True)
  assert _arch(loaded.cfg) == _arch(L32) and "lm_head" not in loaded.params
  ids = _ids(loaded.open_tokenizer(), abstracts)
  ours, _ = llama.apply(loaded.cfg.replace(compute_dtype="float32"), loaded.params, ids)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_export_is_bit_exact_and_ships_the_llama3_tokenizer_and_ids(
  meta31, tmp_path, llama3_dir, abstracts
):
  model, out = meta31
  summary = export(out, str(tmp_path / "hf"), show_progress=False)
  folder = summary["output"]
  assert summary["chat_template"] == "llama3"  # the tokenizer's family, none recorded
  got, want = hf_tensors(folder), model.state_dict()
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name], w.numpy(), err_msg=name)
  config = json.load(open(os.path.join(folder, "config.json")))
  generation = json.load(open(os.path.join(folder, "generation_config.json")))
  for c in (config, generation):
    assert c["bos_token_id"] == 128000 and c["eos_token_id"] == [128001, 128008, 128009]
  assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
  # The tiktoken file became a tokenizer.json that transformers reads as the released one.
  ours = transformers.AutoTokenizer.from_pretrained(folder)
  released = transformers.AutoTokenizer.from_pretrained(str(llama3_dir))
  for text in abstracts[:50]:
    assert ours(text)["input_ids"] == released(text)["input_ids"]
  msgs = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a quasar?"},
  ]
  assert ours.apply_chat_template(msgs, add_generation_prompt=True) == (
    released.apply_chat_template(msgs, add_generation_prompt=True)
  )
  assert chat_templates.by_jinja(ours.chat_template) is chat_templates.LLAMA3
  # transformers computes the same logits on the export as on the original.
  back = transformers.LlamaForCausalLM.from_pretrained(folder).float().eval()
  ids = _ids(Tokenizer(llama3_dir), abstracts)
  np.testing.assert_allclose(hf_logits(back, ids), hf_logits(model, ids), atol=1e-5, rtol=0)


def test_an_hf_llama3_folder_converts_with_its_tokenizer_json(tmp_path, llama3_dir):
  model = make_hf_model(L32, seed=8)
  model.save_pretrained(str(tmp_path / "hf"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / "hf" / name).write_bytes((llama3_dir / name).read_bytes())
  out = convert("hf", str(tmp_path / "hf"), str(tmp_path / "out"), show_progress=False)["output"]
  assert sorted(os.listdir(out)) == ["model_config.json", "params", "tokenizer.json"]
  loaded = loader.load_model(out, on_host=True, need_tokenizer=True)
  assert loaded.cfg.tie_embeddings and loaded.open_tokenizer().eot_id == 128009
  assert chat_templates.choose(tokenizer=loaded.tokenizer_path) is chat_templates.LLAMA3
