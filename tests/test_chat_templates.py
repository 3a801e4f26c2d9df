"""Chat templates as values: the registry, the chooser and the template a checkpoint records."""

import json
import os
from pathlib import Path
import pickle

from helpers import SHARED_DATA
import pytest

from astrollama_jax.checkpoints import layout, loader
from astrollama_jax.data import chat_templates
from astrollama_jax.data.chat_formats import Conversation
from astrollama_jax.data.chat_templates import LLAMA2, TEMPLATES
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.formats.hf_tokenizer import write_hf_tokenizer_files

TOKENIZER = SHARED_DATA / "tokenizer" / "llama2"
TOKENIZER = TOKENIZER / "tokenizer.model"
needs_tokenizer = pytest.mark.skipif(
  not TOKENIZER.exists(), reason="LLaMA-2 tokenizer not in shared data"
)


def test_registry_and_chooser():
  assert TEMPLATES["llama2"] is LLAMA2 and LLAMA2.name == "llama2"
  assert chat_templates.choose() is TEMPLATES[chat_templates.DEFAULT]
  assert chat_templates.choose(recorded="llama2") is LLAMA2
  llama3 = TOKENIZER.parent.parent / "llama3"
  if llama3.exists():  # no template named or recorded: the tokenizer's family decides
    assert chat_templates.choose(tokenizer=str(llama3)) is chat_templates.LLAMA3
    assert chat_templates.choose(recorded="llama2", tokenizer=str(llama3)) is LLAMA2
  if TOKENIZER.exists():
    assert chat_templates.choose(tokenizer=str(TOKENIZER)) is LLAMA2
  with pytest.raises(ValueError, match="unknown chat template 'nope'; known: llama2, llama3"):
    chat_templates.choose("nope", recorded="llama2")  # the flag wins, even when it is wrong
  with pytest.raises(ValueError, match="unknown chat template 'later'"):
    chat_templates.choose(recorded="later")
  assert chat_templates.by_jinja(LLAMA2.jinja) is LLAMA2
  assert chat_templates.by_jinja("{{ messages }}") is None and chat_templates.by_jinja(None) is None
  assert pickle.loads(pickle.dumps(LLAMA2)) == LLAMA2  # Grain workers get it pickled


@needs_tokenizer
def test_llama2_stops_at_eos_and_renders_the_system_prompt_once():
  tok = Tokenizer(TOKENIZER)
  assert LLAMA2.stop_id(tok) == tok.eos_id and LLAMA2.stop_strings == ()
  conv = Conversation((("user", "Q1"), ("assistant", "A1"), ("user", "Q2")), system="Be brief.")
  text = tok.decode(LLAMA2.prompt_ids(tok, conv))
  assert text.count("<<SYS>>") == 1 and text.endswith("[INST] Q2 [/INST]")


def _touch(path: Path, text: str = "") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


@needs_tokenizer
def test_the_recorded_template_of_each_checkpoint_kind(tmp_path):
  hf = tmp_path / "hf"
  write_hf_tokenizer_files(hf, TOKENIZER)
  _touch(hf / "config.json", "{}")
  _touch(hf / "model.safetensors")
  assert loader.recorded_chat_template(str(hf)) == "llama2"
  config = json.loads((hf / "tokenizer_config.json").read_text())
  config["chat_template"] = "{{ messages }}"  # a template we do not know: none recorded
  (hf / "tokenizer_config.json").write_text(json.dumps(config))
  assert loader.recorded_chat_template(str(hf)) is None

  work = tmp_path / "work"
  _touch(work / layout.CONFIG_FILE, "{}")
  os.makedirs(work / layout.CHECKPOINTS_DIR / "3")
  assert loader.recorded_chat_template(str(work)) is None  # no config.json: nothing recorded
  for data, want in (
    ({"kind": "sft", "sft": {"chat_template": "llama2"}}, "llama2"),
    ({"kind": "lm", "sft": {"chat_template": "llama2"}}, None),  # a pre-training run
    ({"kind": "sft", "sft": {}}, None),
  ):
    _touch(work / "config.json", json.dumps({"data": data}))
    assert loader.recorded_chat_template(str(work)) == want, data
