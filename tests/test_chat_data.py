"""Chat SFT data: readers, mixing, SFT batches (the chat template: test_chat_template.py)."""

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
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER = SHARED / "tokenizer" / "llama2" / "tokenizer.model"
SHAREGPT = SHARED / "chat" / "sharegpt_dummy.json"
DEMO_CHAT = REPO / "data" / "demo_chat" / "astro_chat.jsonl"

needs_tokenizer = pytest.mark.skipif(
  not TOKENIZER.exists(), reason="LLaMA-2 tokenizer not in shared data"
)


def _write_jsonl(path: Path, records) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def tok():
  if not TOKENIZER.exists():
    pytest.skip("LLaMA-2 tokenizer not in shared data")
  return Tokenizer(TOKENIZER)


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
