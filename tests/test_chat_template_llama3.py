"""The LLaMA 3 chat template: ids and loss masks equal transformers' apply_chat_template."""

import dataclasses
import json
import re

import pytest

from astrollama_jax.data import chat_formats, chat_templates
from astrollama_jax.data.chat_formats import Conversation
from astrollama_jax.data.chat_templates import LLAMA3
from astrollama_jax.data.tokenizer import Tokenizer

SYSTEMS = [None, "You are a helpful astronomy assistant.", "  Answer briefly.\nUse SI units.  "]


@pytest.fixture(scope="module")
def llama3_dir(shared_data):
  path = shared_data / "tokenizer" / "llama3"
  if not (path / "tokenizer.json").exists():
    pytest.skip("LLaMA 3 tokenizer not in shared data")
  return path


@pytest.fixture(scope="module")
def tok(llama3_dir):
  return Tokenizer(llama3_dir)


@pytest.fixture(scope="module")
def hf_tok(llama3_dir):
  """transformers with the folder's own chat template: LLaMA 3 Instruct's."""
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(llama3_dir))


@pytest.fixture(scope="module")
def sharegpt(shared_data):
  convs, _ = chat_formats.load_conversations(shared_data / "chat" / "sharegpt_dummy.json")
  assert convs
  return [dataclasses.replace(c, system=SYSTEMS[i % 3]) for i, c in enumerate(convs)]


def _hf_ids(hf_tok, conv: Conversation, prompt: bool = False, **kw) -> list[int]:
  ids = hf_tok.apply_chat_template(
    conv.to_messages(), tokenize=True, add_generation_prompt=prompt, **kw
  )
  return list(ids if isinstance(ids, list) else ids["input_ids"])


def test_registered_with_the_family_stop_ids(tok):
  assert chat_templates.get("llama3") is LLAMA3 is chat_templates.by_jinja(LLAMA3.jinja)
  assert LLAMA3.stop_id(tok) == tok.eot_id == 128009
  assert LLAMA3.stop_ids(tok) == (128009, 128001, 128008)
  assert set(LLAMA3.stop_ids(tok)) == {128001, 128008, 128009}


def test_our_jinja_renders_as_the_instruct_template(hf_tok, sharegpt):
  """An exported folder ships LLAMA3.jinja: transformers must render it as Meta's template."""
  config = json.loads(open(hf_tok.name_or_path + "/tokenizer_config.json").read())
  assert config["chat_template"] != LLAMA3.jinja and "<|eot_id|>" in config["chat_template"]
  for conv in sharegpt:
    for prompt in (False, True):
      msgs = conv.to_messages()
      theirs = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
      ours = hf_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=prompt, chat_template=LLAMA3.jinja
      )
      assert ours == theirs, conv.id
  assert theirs.startswith("<|begin_of_text|><|start_header_id|>")
  assert theirs.count("<|begin_of_text|>") == 1
  assert theirs.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_ids_equal_apply_chat_template_on_sharegpt(tok, hf_tok, sharegpt):
  for conv in sharegpt:
    ids, mask = LLAMA3.encode_conversation(tok, conv)
    assert ids == _hf_ids(hf_tok, conv), conv.id
    assert len(mask) == len(ids)
    # The generation prompt for the last reply: the same ids up to the reply itself.
    prompt = dataclasses.replace(conv, turns=conv.turns[:-1])
    prompt_ids = LLAMA3.prompt_ids(tok, prompt)
    assert prompt_ids == _hf_ids(hf_tok, prompt, prompt=True), conv.id
    assert ids[: len(prompt_ids)] == prompt_ids
    assert mask[len(prompt_ids) :] == [1] * (len(ids) - len(prompt_ids))


def test_chat_ids_equal_apply_chat_template_on_mt_bench(tok, hf_tok, shared_data):
  """Multi-turn, code and math, with and without a system prompt."""
  lines = (shared_data / "chat" / "mt_bench_questions.jsonl").read_text().splitlines()
  questions = [json.loads(line) for line in lines]
  picked = [q for q in questions if q["category"] in ("coding", "math", "writing", "extraction")]
  for q in picked:
    reply = q.get("reference", ["Here you go:\n\n```python\ndef f(x):\n    return  x * 2\n```"])[0]
    conv = Conversation(
      turns=(("user", q["turns"][0]), ("assistant", reply), ("user", q["turns"][1])),
      system="You are an expert. Think step by step." if q["question_id"] % 2 else None,
    )
    assert LLAMA3.prompt_ids(tok, conv) == _hf_ids(hf_tok, conv, prompt=True), q["question_id"]
    full = dataclasses.replace(conv, turns=conv.turns + (("assistant", " Done.\n"),))
    assert LLAMA3.encode_conversation(tok, full)[0] == _hf_ids(hf_tok, full), q["question_id"]


def test_loss_on_assistant_replies_and_their_eot_only(tok):
  conv = Conversation(
    (
      ("user", " What is a parsec? "),
      ("assistant", "About 3.26 light-years.\n"),
      ("user", "And an au?"),
      ("assistant", "The Earth-Sun distance."),
    ),
    system="Be brief.",
  )
  sh, eh, eot = 128006, 128007, 128009
  enc = lambda text: tok.encode(text, bos=False)  # noqa: E731
  head = lambda role: [sh, *enc(role), eh]  # noqa: E731
  r1 = enc("\n\nAbout 3.26 light-years.")[1:] + [eot]
  r2 = enc("\n\nThe Earth-Sun distance.")[1:] + [eot]
  nl = enc("\n\n")
  assert nl == [271]
  p1 = [128000, *head("system"), *enc("\n\nBe brief."), eot, *head("user")]
  p1 += [*enc("\n\nWhat is a parsec?"), eot, *head("assistant"), *nl]
  p2 = [*head("user"), *enc("\n\nAnd an au?"), eot, *head("assistant"), *nl]
  ids = p1 + r1 + p2 + r2
  is_reply = [0] * len(p1) + [1] * len(r1) + [0] * len(p2) + [1] * len(r2)
  ex = LLAMA3.encode_for_training(tok, conv)
  assert ex["tokens"].tolist() == ids[:-1] and ex["targets"].tolist() == ids[1:]
  assert ex["loss_mask"].tolist() == is_reply[1:]
  learnt = ex["targets"][ex["loss_mask"] == 1].tolist()
  assert tok.decode(learnt) == "About 3.26 light-years.<|eot_id|>The Earth-Sun distance.<|eot_id|>"
  # Kept to whole exchanges: a budget short of the second drops it, never cuts a reply.
  short = LLAMA3.encode_for_training(tok, conv, seq_len=len(p1) + len(r1) + 3)
  assert short["targets"].tolist() == (p1 + r1)[1:]


def test_decode_reply_stops_at_any_family_end_id(tok):
  reply = tok.encode("A blazar.", bos=False)
  for stop in (128001, 128008, 128009):
    assert LLAMA3.decode_reply(tok, reply + [stop] + tok.encode(" more", bos=False)) == "A blazar."
  assert LLAMA3.decode_reply(tok, reply) == "A blazar."


def test_needs_a_tokenizer_with_header_tokens(tokenizer_path):
  sp = Tokenizer(tokenizer_path)
  with pytest.raises(ValueError, match=re.escape("has no <|start_header_id|> token")):
    LLAMA3.encode_conversation(sp, Conversation((("user", "hi"), ("assistant", "hello"))))


def test_hf_folder_carries_tokenizer_template_and_end_ids(tmp_path, llama3_dir, tok, sharegpt):
  """What export ships for a LLaMA 3 tokenizer loads in transformers and renders our ids."""
  transformers = pytest.importorskip("transformers")
  from astrollama_jax.formats import hf_tokenizer

  (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1, "temperature": 0.6}')
  paths = hf_tokenizer.write_hf_tokenizer_files(tmp_path, llama3_dir, 8192, LLAMA3)
  hf_tokenizer.write_generation_ids(tmp_path, llama3_dir)
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  assert gen == {
    "bos_token_id": 128000,
    "temperature": 0.6,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
  }
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (theirs.bos_token, theirs.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
  assert theirs.chat_template == LLAMA3.jinja and theirs.model_max_length == 8192
  for conv in sharegpt[:50]:
    assert _hf_ids(theirs, conv) == LLAMA3.encode_conversation(tok, conv)[0], conv.id
  # (Meta's tiktoken tokenizer.model ships converted to a tokenizer.json: test_llama3_convert.py)
