"""Chat SFT data: readers, LLaMA-2 chat ids vs transformers, loss mask, truncation, mixing."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from astrollama_jax.data import chat_dataset, chat_formats, chat_template, shards
from astrollama_jax.data.chat_formats import ChatFormatError, Conversation
from astrollama_jax.data.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ASTROLLAMA_SHARED_DATA") or REPO.parent / "shared" / "data")
TOKENIZER = SHARED / "tokenizer" / "llama2" / "tokenizer.model"
SHAREGPT = SHARED / "chat" / "sharegpt_dummy.json"
MT_BENCH = SHARED / "chat" / "mt_bench_questions.jsonl"
ABSTRACTS = SHARED / "arxiv-astro-ph" / "abstracts.jsonl"
DEMO_CHAT = REPO / "data" / "demo_chat" / "astro_chat.jsonl"

needs_tokenizer = pytest.mark.skipif(
  not TOKENIZER.exists(), reason="LLaMA-2 tokenizer not in shared data"
)


def _write_jsonl(path: Path, records) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


# ---------------------------------------------------------------------------------------------
# Formats


def test_every_format_reads_into_the_same_conversation(tmp_path):
  want = Conversation(
    turns=(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")),
    system="Be brief.",
  )
  records = [
    {
      "id": "sg",
      "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "Q2"},
        {"from": "chatgpt", "value": "A2"},
      ],
    },
    {
      "id": "oa",
      "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
      ],
    },
  ]
  path = _write_jsonl(tmp_path / "mixed.jsonl", records)
  convs, report = chat_formats.load_conversations(path)
  assert report == {"ok": 2}
  assert [dataclasses.replace(c, id="") for c in convs] == [want, want]
  assert [c.id for c in convs] == ["sg", "oa"]

  no_sys = dataclasses.replace(want, system=None)
  cases = {
    "ultrachat": {"id": 7, "data": ["Q1", "A1", "Q2", "A2"]},
    "lima": {"conversations": ["Q1", "A1", "Q2", "A2"]},
  }
  for fmt, rec in cases.items():
    assert dataclasses.replace(chat_formats.parse_record(rec, fmt), id="") == no_sys
    assert chat_formats.detect_format(rec) == fmt
  assert chat_formats.parse_record(cases["ultrachat"]).id == "7"
  orca = chat_formats.parse_record(
    {"id": "o", "system_prompt": "Be brief.", "question": "Q1", "response": "A1"}
  )
  assert orca == Conversation((("user", "Q1"), ("assistant", "A1")), "Be brief.", "o")
  orca_nosys = chat_formats.parse_record(
    {"system_prompt": "", "question": "Q1", "response": "A1"}, "openorca"
  )
  assert orca_nosys.system is None


def test_lmflow_and_json_array_files(tmp_path):
  lmflow = {
    "type": "conversation",
    "instances": [
      {
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
      },
      {"system": "", "messages": [{"role": "user", "content": "Q1"}]},  # no reply: skipped
    ],
  }
  (tmp_path / "lm.json").write_text(json.dumps(lmflow))
  convs, report = chat_formats.load_conversations(tmp_path / "lm.json", "lmflow")
  assert report == {"ok": 1, "no assistant reply": 1}
  assert convs[0].turns == (("user", "Q1"), ("assistant", "A1")) and convs[0].system == "Be brief."
  assert convs[0].id == "lm.json:0"

  (tmp_path / "arr.json").write_text(json.dumps([{"conversations": ["Q", "A"]}, 5]))
  convs, report = chat_formats.load_conversations(tmp_path / "arr.json")
  assert report == {"ok": 1, "record is not a JSON object": 1}

  (tmp_path / "bad.json").write_text("[{")
  with pytest.raises(ValueError, match="bad.json"):
    chat_formats.load_conversations(tmp_path / "bad.json")
  (tmp_path / "x.txt").write_text("")
  with pytest.raises(ValueError, match="json or .jsonl"):
    chat_formats.load_conversations(tmp_path / "x.txt")
  (tmp_path / "other.json").write_text(json.dumps({"type": "text_only", "instances": []}))
  with pytest.raises(ValueError, match="text_only"):
    chat_formats.load_conversations(tmp_path / "other.json")


def test_malformed_records_are_skipped_and_counted(tmp_path):
  sg = lambda *turns: {"conversations": [{"from": f, "value": v} for f, v in turns]}
  records = [
    "{not json",
    [1, 2],
    {"text": "plain"},
    sg(("human", "a"), ("human", "b")),
    sg(("human", "a"), ("wizard", "b")),
    sg(("human", "a"), ("gpt", "   ")),
    sg(("human", "only a question")),
    sg(("human", "a"), ("gpt", "b"), ("system", "late")),
    sg(("human", "say </s> now"), ("gpt", "no")),
    {"conversations": [{"from": "human"}]},
    {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
    {
      "question": "q"  # no response -> unknown format
    },
    sg(("gpt", "Hello! Ask me anything."), ("human", "a"), ("gpt", "b"), ("human", "dangling")),
  ]
  path = _write_jsonl(tmp_path / "bad.jsonl", records)
  convs, report = chat_formats.load_conversations(path)
  assert report == {
    "invalid JSON line": 1,
    "record is not a JSON object": 1,
    "unknown format": 2,
    "roles do not alternate": 1,
    "unknown role": 1,
    "empty turn": 1,
    "no assistant reply": 1,
    "system turn after the start": 1,
    "special token text in a turn": 1,
    "turn lacks from/value": 1,
    "turn text is not a string": 1,
    "ok": 1,
  }
  # The readable one lost its greeting (leading assistant) and its unanswered last question.
  assert convs[0].turns == (("user", "a"), ("assistant", "b"))
  # Forcing a format that does not fit names what is missing.
  with pytest.raises(ChatFormatError, match="missing field for openorca"):
    chat_formats.parse_record(sg(("human", "a"), ("gpt", "b")), "openorca")
  with pytest.raises(ValueError, match="unknown chat format"):
    chat_formats.parse_record({}, "alpaca")
  # For generation a final user turn is kept.
  prompt = chat_formats.parse_record(
    sg(("human", "a"), ("gpt", "b"), ("human", "c")), require_reply=False
  )
  assert prompt.turns[-1] == ("user", "c")


def test_shared_sharegpt_reads_fully():
  if not SHAREGPT.exists():
    pytest.skip("shared chat data missing")
  convs, report = chat_formats.load_conversations(SHAREGPT, "sharegpt")
  assert report == {"ok": 500}
  assert sum(len(c.turns) for c in convs) == 2000


def test_demo_chat_set_layout():
  convs, report = chat_formats.load_conversations(DEMO_CHAT, "sharegpt")
  assert report == {"ok": len(convs)} and 35 <= len(convs) <= 50
  assert sum(c.system is not None for c in convs) >= 5
  assert sum(len(c.turns) > 2 for c in convs) >= 5
  assert len({c.id for c in convs}) == len(convs)


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
  paths = chat_template.write_hf_tokenizer_files(out, TOKENIZER)
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
  assert config["chat_template"] == chat_template.LLAMA2_CHAT_TEMPLATE
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
    ids, mask = chat_template.encode_conversation(tok, conv)
    assert ids == _hf_chat_ids(hf_tok, conv), conv.id
    assert len(mask) == len(ids)
    # The prompt for the last reply is the same ids up to that reply.
    prompt = dataclasses.replace(conv, turns=conv.turns[:-1])
    prompt_ids = chat_template.build_prompt_ids(prompt, tok)
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
    assert chat_template.build_prompt_ids(conv, tok) == _hf_chat_ids(hf_tok, conv), q["question_id"]
    full = dataclasses.replace(conv, turns=conv.turns + (("assistant", "Done."),))
    assert chat_template.encode_conversation(tok, full)[0] == _hf_chat_ids(hf_tok, full), q[
      "question_id"
    ]


def test_demo_chat_ids_equal_apply_chat_template(tok, hf_tok):
  convs, _ = chat_formats.load_conversations(DEMO_CHAT)
  for conv in convs:
    assert chat_template.encode_conversation(tok, conv)[0] == _hf_chat_ids(hf_tok, conv), conv.id


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
  ex = chat_template.encode_for_training(
    tok, Conversation((("user", "hi there"), ("assistant", "hello")))
  )
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
  ex = chat_template.encode_for_training(tok, conv)
  assert ex["tokens"].tolist() == ids[:-1] and ex["targets"].tolist() == ids[1:]
  assert ex["loss_mask"].tolist() == is_reply[1:]
  # what is learnt, decoded: the two replies, each closed by EOS
  learnt = ex["targets"][ex["loss_mask"] == 1].tolist()
  assert learnt == r1 + r2 and learnt.count(tok.eos_id) == 2
  # a final unanswered user turn adds nothing to the training example
  longer = dataclasses.replace(conv, turns=conv.turns + (("user", "Thanks!"),))
  assert chat_template.encode_for_training(tok, longer)["tokens"].tolist() == ex["tokens"].tolist()


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
  first_ids, _ = chat_template.encode_conversation(
    tok, dataclasses.replace(conv, turns=conv.turns[:2])
  )
  full = chat_template.encode_for_training(tok, conv)
  n_full = len(full["tokens"])
  for seq_len in (len(first_ids) - 1, len(first_ids) + 5, n_full - 1):
    ex = chat_template.encode_for_training(tok, conv, seq_len=seq_len)
    assert ex["tokens"].tolist() == first_ids[:-1]  # second exchange dropped whole
    assert ex["loss_mask"][-1] == 1.0 and ex["targets"][-1] == tok.eos_id
  assert (
    chat_template.encode_for_training(tok, conv, seq_len=n_full)["tokens"].tolist()
    == full["tokens"].tolist()
  )
  with pytest.raises(ChatFormatError, match="first exchange too long"):
    chat_template.encode_for_training(tok, conv, seq_len=len(first_ids) - 2)


@needs_tokenizer
def test_build_prompt_ids_needs_a_final_user_turn(tok):
  conv = Conversation((("user", "Q"), ("assistant", "A")))
  with pytest.raises(ValueError, match="ends with a user turn"):
    chat_template.build_prompt_ids(conv, tok)
  ids = chat_template.build_prompt_ids(Conversation((("user", "Q"),)), tok)
  assert ids[0] == tok.bos_id and tok.decode(ids[-4:]).endswith("[/INST]")
  assert (
    chat_template.decode_reply(tok, tok.encode("Sure thing ", bos=False) + [tok.eos_id, 999])
    == "Sure thing"
  )


# ---------------------------------------------------------------------------------------------
# Mixtures


def _numbered_source(path: Path, n: int, tag: str) -> Path:
  return _write_jsonl(
    path, [{"id": f"{tag}{i}", "conversations": [f"q{tag}{i}", f"a{tag}{i}"]} for i in range(n)]
  )


def test_mix_sources_counts_weights_and_determinism(tmp_path):
  a = _numbered_source(tmp_path / "a.jsonl", 30, "a")
  b = _numbered_source(tmp_path / "b.jsonl", 10, "b")
  c = _numbered_source(tmp_path / "c.jsonl", 4, "c")
  spec = [
    (str(a), "lima", 12, None),
    dict(path=str(b), format="auto", weight=0.5),
    chat_dataset.ChatSource(str(c)),
  ]
  report = {}
  mixed = chat_dataset.mix_sources(spec, seed=3, report=report)
  ids = [m.id for m in mixed]
  assert sum(i.startswith("a") for i in ids) == 12 and sum(i.startswith("b") for i in ids) == 5
  assert sorted(i for i in ids if i.startswith("c")) == ["c0", "c1", "c2", "c3"]
  assert len(set(ids)) == len(ids) == 21
  assert report[str(a)] == {"ok": 30, "taken": 12}
  assert ids == [m.id for m in chat_dataset.mix_sources(spec, seed=3)]
  assert ids != [m.id for m in chat_dataset.mix_sources(spec, seed=4)]
  assert ids[:12] != sorted(ids[:12])  # shuffled across sources
  # A source's picks do not depend on the other sources.
  alone = {m.id for m in chat_dataset.mix_sources([spec[0]], seed=3)}
  assert alone == {i for i in ids if i.startswith("a")}
  # Asking for more than there is repeats the source, each conversation at most twice here.
  over = [m.id for m in chat_dataset.mix_sources([(str(c), "auto", 7, None)], seed=0)]
  assert (
    len(over) == 7
    and set(over) == {"c0", "c1", "c2", "c3"}
    and max(over.count(i) for i in over) == 2
  )


def test_mix_sources_rejects_bad_specs(tmp_path):
  a = _numbered_source(tmp_path / "a.jsonl", 3, "a")
  with pytest.raises(ValueError, match="not both"):
    chat_dataset.mix_sources([(str(a), "auto", 1, 1.0)], seed=0)
  with pytest.raises(ValueError, match="unknown format"):
    chat_dataset.mix_sources([(str(a), "alpaca", None, None)], seed=0)
  with pytest.raises(ValueError, match="unknown keys"):
    chat_dataset.mix_sources([dict(path=str(a), cnt=3)], seed=0)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    chat_dataset.mix_sources([(str(tmp_path / "nope.jsonl"),)], seed=0)
  empty = _write_jsonl(tmp_path / "empty.jsonl", ["{}"])
  with pytest.raises(ValueError, match="no readable conversations"):
    chat_dataset.mix_sources([(str(empty), "auto", 2, None)], seed=0)


def test_sft_config_fields():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "astro_chat_sft", REPO / "configs" / "astro_chat_sft.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert (
    config.data.kind == "sft" and config.data.seq_len == 2048 and config.model.preset == "llama2_7b"
  )
  counts = [s["count"] for s in config.data.sft.sources]
  assert counts == [10_356, None, 10_000, 10_000]
  assert [s["format"] for s in config.data.sft.sources] == [
    "sharegpt",
    "lima",
    "openorca",
    "ultrachat",
  ]
  assert [chat_dataset.ChatSource.of(s).count for s in config.data.sft.sources] == counts
  assert config.train.global_batch_size == 48 and config.schedule.warmup_ratio == 0.03
  assert (
    config.schedule.learning_rate == 2e-5
    and module.get_config("70b").schedule.learning_rate == 3e-7
  )
  assert module.get_config("70b").model.preset == "llama2_70b"


# ---------------------------------------------------------------------------------------------
# The Grain SFT pipeline


def _segments(batch):
  """(tokens, targets, loss_mask) of every packed segment of a batch, checking the row layout."""
  out = []
  for row in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][row]
    n = int(seg.max())
    used = seg > 0
    assert seg[used].tolist() == sorted(seg[used].tolist()) and set(seg[used].tolist()) == set(
      range(1, n + 1)
    )
    assert (np.diff(used.astype(int)) <= 0).all()  # padding only at the end
    assert (batch["loss_mask"][row][~used] == 0).all()
    for s in range(1, n + 1):
      where = seg == s
      assert batch["positions"][row][where].tolist() == list(range(int(where.sum())))
      out.append(
        tuple(tuple(batch[k][row][where].tolist()) for k in ("tokens", "targets", "loss_mask"))
      )
  return out


@needs_tokenizer
def test_sft_dataset_batches_shards_and_resumes(tok):
  sources = [(str(DEMO_CHAT), "sharegpt", None, None)]
  seq_len, batch_size = 192, 2
  # every example the mixture can produce, keyed by its tokens
  examples = {}
  for conv in chat_dataset.mix_sources(sources, seed=5):
    ex = chat_template.encode_for_training(tok, conv, seq_len)
    examples[tuple(ex["tokens"].tolist())] = (ex["targets"].tolist(), ex["loss_mask"].tolist())

  seen = []
  for process in range(2):
    ds = chat_dataset.make_sft_dataset(
      sources, TOKENIZER, seq_len, batch_size, seed=5, process_index=process, process_count=2
    )
    batches = list(ds)
    assert batches, "no batches"
    for batch in batches:
      assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
      for k, v in batch.items():
        assert v.shape == (batch_size, seq_len), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
      for tokens, targets, mask in _segments(batch):
        assert examples[tokens] == (list(targets), list(mask))
        seen.append((process, tokens))
  by_process = [{t for p, t in seen if p == q} for q in (0, 1)]
  assert by_process[0] and by_process[1] and not by_process[0] & by_process[1]
  assert (
    len(seen) == len(set(seen)) >= 0.7 * len(examples)
  )  # each once; a partial last batch is dropped

  # Iterator state: stop after two batches, restore in a fresh iterator, get the same rest.
  ds = chat_dataset.make_sft_dataset(
    sources, TOKENIZER, seq_len, batch_size, seed=5, num_epochs=None
  )
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(
    chat_dataset.make_sft_dataset(sources, TOKENIZER, seq_len, batch_size, seed=5, num_epochs=None)
  )
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@needs_tokenizer
def test_sft_data_shards_resume_on_another_process_count():
  """Over 4 data shards, 2 processes and 1 read the same global batches, and a position saved by
  2 processes regathers onto 1 (and 1 onto 4): the rest is the uninterrupted run's."""
  sources = [(str(DEMO_CHAT), "sharegpt", None, None)]

  def its(processes: int) -> list:
    return [
      iter(
        chat_dataset.make_sft_dataset(
          sources,
          TOKENIZER,
          192,
          4 // processes,
          seed=5,
          process_index=p,
          process_count=processes,
          shards=4,
          num_epochs=None,
        )
      )
      for p in range(processes)
    ]

  def batches(iterators: list, n: int) -> list[dict]:
    out = []
    for _ in range(n):
      parts = [next(it) for it in iterators]
      out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
    return out

  want = batches(its(1), 4)
  for before, after in ((2, 1), (1, 4)):
    first = its(before)
    got = batches(first, 2)
    states = [json.loads(json.dumps(it.get_state())) for it in first]
    second = its(after)
    for p, it in enumerate(second):
      it.set_state(shards.regather(states, shards.owned(p, after, 4)))
    got += batches(second, 2)
    for g, w in zip(got, want, strict=True):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k])
