"""The LLaMA-2 chat template: ids and loss masks equal transformers' apply_chat_template."""

import dataclasses
import json
import os
from pathlib import Path

from helpers import SHARED_DATA
import numpy as np
import pytest

from astrollama_jax.data import chat_formats
from astrollama_jax.data.chat_formats import ChatFormatError, Conversation
from astrollama_jax.data.chat_templates import LLAMA2
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.formats.hf_tokenizer import write_hf_tokenizer_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
TOKENIZER = SHARED / "tokenizer" / "llama2" / "tokenizer.model"
SHAREGPT = SHARED / "chat" / "sharegpt_dummy.json"
MT_BENCH = SHARED / "chat" / "mt_bench_questions.jsonl"
ABSTRACTS = SHARED / "arxiv-astro-ph" / "abstracts.jsonl"
DEMO_CHAT = REPO / "data" / "demo_chat" / "astro_chat.jsonl"

needs_tokenizer = pytest.mark.skipif(
  not TOKENIZER.exists(), reason="LLaMA-2 tokenizer not in shared data"
)


# ---------------------------------------------------------------------------------------------
# Token ids vs transformers


@pytest.fixture(scope="module")
def tok():
  if not TOKENIZER.exists():
    pytest.skip("LLaMA-2 tokenizer not in shared data")
  return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  if not TOKENIZER.exists():
    pytest.skip("LLaMA-2 tokenizer not in shared data")
  out = tmp_path_factory.mktemp("hf_tok")
  paths = write_hf_tokenizer_files(out, TOKENIZER)
  assert sorted(os.path.basename(p) for p in paths) == [
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
  ]
  return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
  transformers = pytest.importorskip("transformers")
  os.environ["HF_HUB_OFFLINE"] = "1"
  return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def _hf_chat_ids(hf_tok, conv: Conversation) -> list[int]:
  ids = hf_tok.apply_chat_template(conv.to_messages(), tokenize=True)
  ids = ids["input_ids"] if not isinstance(ids, list) else ids
  return list(ids)


def test_hf_tokenizer_folder(hf_dir, hf_tok):
  config = json.loads((hf_dir / "tokenizer_config.json").read_text())
  assert config["chat_template"] == LLAMA2.jinja
  assert config["add_bos_token"] is True and config["add_eos_token"] is False
  assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
  assert type(hf_tok).__name__ == "LlamaTokenizer"
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)
  assert (hf_dir / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()


def test_chat_ids_equal_apply_chat_template_on_sharegpt(tok, hf_tok):
  if not SHAREGPT.exists():
    pytest.skip("shared chat data missing")
  convs, _ = chat_formats.load_conversations(SHAREGPT)
  systems = [None, "You are a helpful astronomy assistant.", "  Answer briefly.\nUse SI units.  "]
  for i, conv in enumerate(convs):
    conv = dataclasses.replace(conv, system=systems[i % 3])
    ids, mask = LLAMA2.encode_conversation(tok, conv)
    assert ids == _hf_chat_ids(hf_tok, conv), conv.id
    assert len(mask) == len(ids)
    # The prompt for the last reply is the same ids up to that reply.
    prompt = dataclasses.replace(conv, turns=conv.turns[:-1])
    prompt_ids = LLAMA2.prompt_ids(tok, prompt)
    assert prompt_ids == _hf_chat_ids(hf_tok, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids and mask[len(prompt_ids) :] == [1] * (
      len(ids) - len(prompt_ids)
    )


def test_chat_ids_equal_apply_chat_template_on_mt_bench(tok, hf_tok):
  if not MT_BENCH.exists():
    pytest.skip("shared chat data missing")
  questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines()]
  # Coding questions carry indented code: whitespace runs must tokenize like SentencePiece.
  picked = [q for q in questions if q["category"] in ("coding", "math", "writing", "extraction")]
  assert any("\n    " in t for q in picked for t in q["turns"])
  for q in picked:
    reply = q.get("reference", ["Here you go:\n\n```python\ndef f(x):\n    return  x * 2\n```"])[0]
    conv = Conversation(
      turns=(("user", q["turns"][0]), ("assistant", reply), ("user", q["turns"][1])),
      system="You are an expert. Think step by step." if q["question_id"] % 2 else None,
    )
    assert LLAMA2.prompt_ids(tok, conv) == _hf_chat_ids(hf_tok, conv), q["question_id"]
    full = dataclasses.replace(conv, turns=conv.turns + (("assistant", "Done."),))
    assert LLAMA2.encode_conversation(tok, full)[0] == _hf_chat_ids(hf_tok, full), q["question_id"]


def test_demo_chat_ids_equal_apply_chat_template(tok, hf_tok):
  convs, _ = chat_formats.load_conversations(DEMO_CHAT)
  for conv in convs:
    assert LLAMA2.encode_conversation(tok, conv)[0] == _hf_chat_ids(hf_tok, conv), conv.id


def test_plain_encode_equals_auto_tokenizer_on_abstracts(tok, hf_tok):
  if not ABSTRACTS.exists():
    pytest.skip("shared abstracts missing")
  with open(ABSTRACTS) as f:
    records = [json.loads(next(f)) for _ in range(200)]
  for r in records:
    for text in (r["abstract"], r["title"]):
      assert tok.encode(text) == hf_tok.encode(text), r["id"]
      assert tok.encode(text, bos=False) == hf_tok.encode(text, add_special_tokens=False), r["id"]


def test_tokenizer_json_alone_reproduces_sentencepiece(tok, hf_dir):
  """tokenizer.json is what non-transformers consumers (and transformers 4) load verbatim."""
  tokenizers = pytest.importorskip("tokenizers")
  backend = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  texts = [
    "  leading spaces",
    " one",
    "a  b",
    "x\n    y",
    "def f():\n        return 1\n",
    "tabs\t\tand  spaces   ",
    "Ångström 10^{-3} ±σ",
    "日本語のテキスト",
    "1234567890",
    "[INST] x [/INST]",
  ]
  texts += [" " * n + "w" + " " * n for n in range(1, 20)]
  for text in texts:
    assert backend.encode(text).ids == tok.encode(text), repr(text)
    assert backend.decode(tok.encode(text, bos=False)) == text, repr(text)


def test_template_rejects_non_alternating_roles(hf_tok):
  with pytest.raises(Exception, match="alternate"):
    hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---------------------------------------------------------------------------------------------
# Loss mask and truncation


@needs_tokenizer
def test_loss_mask_exact_positions_single_exchange(tok):
  ex = LLAMA2.encode_for_training(tok, Conversation((("user", "hi there"), ("assistant", "hello"))))
  # <s> ▁[ INST ] ▁hi ▁there ▁[ / INST ] ▁hello ▁ </s>
  ids = [1, 518, 25580, 29962, 7251, 727, 518, 29914, 25580, 29962, 22172, 29871, 2]
  assert ex["tokens"].tolist() == ids[:-1] and ex["targets"].tolist() == ids[1:]
  assert ex["loss_mask"].tolist() == [0.0] * 9 + [1.0] * 3
  assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32


@needs_tokenizer
def test_loss_mask_exact_positions_with_system_and_two_exchanges(tok):
  conv = Conversation(
    (
      ("user", " What is a parsec? "),
      ("assistant", "About 3.26 light-years.\n"),
      ("user", "And an au?"),
      ("assistant", "The Earth-Sun distance."),
    ),
    system="Be brief.",
  )
  # strip() applies to the whole first message, system block included: the user's leading
  # space stays
  p1 = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n What is a parsec? [/INST]")
  r1 = tok.encode("About 3.26 light-years. ", bos=False) + [tok.eos_id]
  p2 = tok.encode("[INST] And an au? [/INST]")
  r2 = tok.encode("The Earth-Sun distance. ", bos=False) + [tok.eos_id]
  ids = p1 + r1 + p2 + r2
  is_reply = [0] * len(p1) + [1] * len(r1) + [0] * len(p2) + [1] * len(r2)
  ex = LLAMA2.encode_for_training(tok, conv)
  assert ex["tokens"].tolist() == ids[:-1] and ex["targets"].tolist() == ids[1:]
  assert ex["loss_mask"].tolist() == is_reply[1:]
  # what is learnt, decoded: the two replies, each closed by EOS
  learnt = ex["targets"][ex["loss_mask"] == 1].tolist()
  assert learnt == r1 + r2 and learnt.count(tok.eos_id) == 2
  # a final unanswered user turn adds nothing to the training example
  longer = dataclasses.replace(conv, turns=conv.turns + (("user", "Thanks!"),))
  assert LLAMA2.encode_for_training(tok, longer)["tokens"].tolist() == ex["tokens"].tolist()


@needs_tokenizer
def test_truncation_drops_whole_trailing_exchanges(tok):
  conv = Conversation(
    (
      ("user", "Q one"),
      ("assistant", "A one " * 5),
      ("user", "Q two"),
      ("assistant", "A two " * 50),
    )
  )
  first_ids, _ = LLAMA2.encode_conversation(tok, dataclasses.replace(conv, turns=conv.turns[:2]))
  full = LLAMA2.encode_for_training(tok, conv)
  n_full = len(full["tokens"])
  for seq_len in (len(first_ids) - 1, len(first_ids) + 5, n_full - 1):
    ex = LLAMA2.encode_for_training(tok, conv, seq_len=seq_len)
    assert ex["tokens"].tolist() == first_ids[:-1]  # second exchange dropped whole
    assert ex["loss_mask"][-1] == 1.0 and ex["targets"][-1] == tok.eos_id
  assert (
    LLAMA2.encode_for_training(tok, conv, seq_len=n_full)["tokens"].tolist()
    == full["tokens"].tolist()
  )
  with pytest.raises(ChatFormatError, match="first exchange too long"):
    LLAMA2.encode_for_training(tok, conv, seq_len=len(first_ids) - 2)


@needs_tokenizer
def test_build_prompt_ids_needs_a_final_user_turn(tok):
  conv = Conversation((("user", "Q"), ("assistant", "A")))
  with pytest.raises(ValueError, match="ends with a user turn"):
    LLAMA2.prompt_ids(tok, conv)
  ids = LLAMA2.prompt_ids(tok, Conversation((("user", "Q"),)))
  assert ids[0] == tok.bos_id and tok.decode(ids[-4:]).endswith("[/INST]")
  assert (
    LLAMA2.decode_reply(tok, tok.encode("Sure thing ", bos=False) + [tok.eos_id, 999])
    == "Sure thing"
  )
