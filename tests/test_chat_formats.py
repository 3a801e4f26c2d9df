"""Chat files: every format reads into the same Conversation; malformed records are counted."""

import dataclasses
import json
from pathlib import Path

from helpers import SHARED_DATA
import pytest

from astrollama_jax.data import chat_formats
from astrollama_jax.data.chat_formats import ChatFormatError, Conversation

REPO = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
SHAREGPT = SHARED / "chat" / "sharegpt_dummy.json"
DEMO_CHAT = REPO / "data" / "demo_chat" / "astro_chat.jsonl"


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
