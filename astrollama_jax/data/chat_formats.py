"""Chat data sets in their many JSON shapes, read into one ``Conversation`` type.

Public chat sets disagree on field names (ShareGPT ``from``/``value``, OpenAI ``role``/``content``,
LIMA's bare string lists, OpenOrca's three columns, LMFlow's ``instances``). Everything downstream
(template, loss mask, packing) sees only ``Conversation``: an optional system prompt plus turns that
alternate user/assistant and start with the user.

A record that cannot be read is skipped and counted by reason, never fatal: one bad line in a
100k-line dump should cost that line, not the run.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterable, Iterator

from absl import logging

USER = "user"
ASSISTANT = "assistant"
SYSTEM = "system"

FORMATS = ("auto", "sharegpt", "openai", "ultrachat", "openorca", "lima", "lmflow")

# Role spellings seen in the wild, mapped onto our three roles.
_ROLE_ALIASES = {
  "human": USER,
  "user": USER,
  "gpt": ASSISTANT,
  "chatgpt": ASSISTANT,
  "assistant": ASSISTANT,
  "bing": ASSISTANT,
  "bard": ASSISTANT,
  "model": ASSISTANT,
  "system": SYSTEM,
}

# Literal special-token text inside a message would be read by HF as a real BOS/EOS when it
# tokenizes the rendered template, so our ids and HF's could differ. Such records are skipped.
_SPECIAL_STRINGS = ("<s>", "</s>")


class ChatFormatError(ValueError):
  """A record that cannot become a ``Conversation``; ``reason`` is the short counting key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Conversation:
  """A system prompt (or None) and (role, text) turns alternating user/assistant from the user.

  A conversation meant for training ends with an assistant turn; one meant for generation ends
  with the user turn the model should answer.
  """

  turns: tuple[tuple[str, str], ...]
  system: str | None = None
  id: str = ""

  def __post_init__(self):
    for i, (role, text) in enumerate(self.turns):
      expected = USER if i % 2 == 0 else ASSISTANT
      if role != expected:
        raise ChatFormatError(
          "roles do not alternate", f"turn {i} is {role!r}, expected {expected!r}"
        )
      if not isinstance(text, str):
        raise ChatFormatError("turn text is not a string", f"turn {i}")

  @property
  def exchanges(self) -> list[tuple[str, str | None]]:
    """(user, assistant) pairs; the last assistant is None when the conversation ends on the user."""
    texts = [t for _, t in self.turns]
    return [
      (texts[i], texts[i + 1] if i + 1 < len(texts) else None) for i in range(0, len(texts), 2)
    ]

  def to_messages(self) -> list[dict[str, str]]:
    """OpenAI-style message list (what ``transformers.apply_chat_template`` takes)."""
    out = [{"role": SYSTEM, "content": self.system}] if self.system is not None else []
    return out + [{"role": r, "content": t} for r, t in self.turns]

  def to_sharegpt(self) -> dict[str, Any]:
    names = {USER: "human", ASSISTANT: "gpt", SYSTEM: "system"}
    conv = [{"from": "system", "value": self.system}] if self.system is not None else []
    conv += [{"from": names[r], "value": t} for r, t in self.turns]
    return {"id": self.id, "conversations": conv}


def detect_format(record: Any) -> str:
  """Name the format of one record from its keys; raises ``ChatFormatError`` if none fits."""
  if not isinstance(record, dict):
    raise ChatFormatError("record is not a JSON object", type(record).__name__)
  conv = record.get("conversations")
  if isinstance(conv, list):
    if conv and all(isinstance(t, str) for t in conv):
      return "lima"
    return "sharegpt"
  if isinstance(record.get("messages"), list):
    return "openai"  # also UltraChat's HF release and an LMFlow instance (+ "system")
  if isinstance(record.get("data"), list):
    return "ultrachat"
  if "question" in record and "response" in record:
    return "openorca"
  raise ChatFormatError("unknown format", f"keys {sorted(record)[:8]}")


def _text(value: Any, where: str) -> str:
  if not isinstance(value, str):
    raise ChatFormatError("turn text is not a string", where)
  return value


def _keyed_turns(turns: list, role_key: str, text_key: str) -> list[tuple[str, str]]:
  """Turns given as dicts with a role field and a text field (ShareGPT, OpenAI messages)."""
  out = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
      raise ChatFormatError(f"turn lacks {role_key}/{text_key}", f"turn {i}")
    role = _ROLE_ALIASES.get(str(turn[role_key]).lower())
    if role is None:
      raise ChatFormatError("unknown role", repr(turn[role_key]))
    out.append((role, _text(turn[text_key], f"turn {i}")))
  return out


def _role_turns_sharegpt(record: dict) -> list[tuple[str, str]]:
  return _keyed_turns(record["conversations"], "from", "value")


def _role_turns_openai(record: dict) -> list[tuple[str, str]]:
  out = [(SYSTEM, _text(record["system"], "system"))] if record.get("system") else []
  return out + _keyed_turns(record["messages"], "role", "content")


def _role_turns_alternating(strings: list) -> list[tuple[str, str]]:
  return [(USER if i % 2 == 0 else ASSISTANT, _text(s, f"turn {i}")) for i, s in enumerate(strings)]


def _role_turns(record: dict, fmt: str) -> list[tuple[str, str]]:
  try:
    if fmt == "sharegpt":
      return _role_turns_sharegpt(record)
    if fmt in ("openai", "lmflow"):
      return _role_turns_openai(record)
    if fmt == "lima":
      return _role_turns_alternating(record["conversations"])
    if fmt == "ultrachat":
      if isinstance(record.get("messages"), list):
        return _role_turns_openai(record)
      return _role_turns_alternating(record["data"])
    if fmt == "openorca":
      turns = [
        (USER, _text(record["question"], "question")),
        (ASSISTANT, _text(record["response"], "response")),
      ]
      system = record.get("system_prompt")
      return ([(SYSTEM, _text(system, "system_prompt"))] if system else []) + turns
  except (KeyError, TypeError) as e:
    raise ChatFormatError(f"missing field for {fmt}", repr(e)) from None
  raise ValueError(f"unknown chat format {fmt!r}; expected one of {FORMATS}")


def parse_record(record: Any, fmt: str = "auto", require_reply: bool = True) -> Conversation:
  """Turn one JSON record into a ``Conversation``; raises ``ChatFormatError`` with a reason.

  Leading assistant turns (ShareGPT dumps often open with the bot's greeting) are dropped, as is a
  trailing user turn when ``require_reply`` (there is no reply to learn from).
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown chat format {fmt!r}; expected one of {FORMATS}")
  if not isinstance(record, dict):
    raise ChatFormatError("record is not a JSON object", type(record).__name__)
  if fmt == "auto":
    fmt = detect_format(record)
  turns = _role_turns(record, fmt)
  system = None
  if turns and turns[0][0] == SYSTEM:
    system = turns.pop(0)[1]
    system = system if system.strip() else None
  if any(role == SYSTEM for role, _ in turns):
    raise ChatFormatError("system turn after the start")
  while turns and turns[0][0] != USER:
    turns.pop(0)
  for i, (role, _) in enumerate(turns):
    if role != (USER if i % 2 == 0 else ASSISTANT):
      raise ChatFormatError("roles do not alternate", f"turn {i} is {role!r}")
  if require_reply and turns and turns[-1][0] == USER:
    turns.pop()
  if not turns or (require_reply and len(turns) < 2):
    raise ChatFormatError("no assistant reply")
  for i, (_, text) in enumerate(turns):
    if not text.strip():
      raise ChatFormatError("empty turn", f"turn {i}")
  for text in [t for _, t in turns] + ([system] if system else []):
    if any(s in text for s in _SPECIAL_STRINGS):
      raise ChatFormatError("special token text in a turn")
  rid = record.get("id", record.get("question_id", ""))
  return Conversation(turns=tuple(turns), system=system, id=str(rid))


def _records(path: str, report: collections.Counter) -> Iterator[tuple[int, Any]]:
  """(index, record) from a .json array / LMFlow object or a .jsonl file; bad lines counted."""
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if not line.strip():
          continue
        try:
          yield i, json.loads(line)
        except json.JSONDecodeError:
          report["invalid JSON line"] += 1
          logging.warning("%s:%d: invalid JSON line, skipped", path, i + 1)
    return
  if not path.endswith(".json"):
    raise ValueError(f"{path}: chat data must be .json or .jsonl")
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if isinstance(data, dict) and isinstance(data.get("instances"), list):  # LMFlow
    if data.get("type") != "conversation":
      raise ValueError(
        f"{path}: LMFlow dataset of type {data.get('type')!r}, expected 'conversation'"
      )
    data = data["instances"]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON array of records or an LMFlow object")
  yield from enumerate(data)


def read_conversations(
  path: str | os.PathLike,
  fmt: str = "auto",
  report: collections.Counter | None = None,
  require_reply: bool = True,
) -> Iterator[Conversation]:
  """Yield the readable conversations of one file; skipped records land in ``report[reason]``."""
  path = os.fspath(path)
  report = collections.Counter() if report is None else report
  if fmt not in FORMATS:
    raise ValueError(f"unknown chat format {fmt!r}; expected one of {FORMATS}")
  for i, record in _records(path, report):
    try:
      conv = parse_record(record, fmt, require_reply=require_reply)
    except ChatFormatError as e:
      report[e.reason] += 1
      if report[e.reason] <= 3:
        logging.warning("%s record %d skipped: %s", path, i, e)
      continue
    report["ok"] += 1
    yield conv if conv.id else dataclasses.replace(conv, id=f"{os.path.basename(path)}:{i}")


def load_conversations(
  path: str | os.PathLike, fmt: str = "auto", require_reply: bool = True
) -> tuple[list[Conversation], dict[str, int]]:
  """All readable conversations of a file and the report {reason: count} ("ok" for kept ones)."""
  report: collections.Counter = collections.Counter()
  convs = list(read_conversations(path, fmt, report, require_reply))
  return convs, dict(report)


def write_sharegpt_jsonl(path: str | os.PathLike, conversations: Iterable[Conversation]) -> None:
  """Write conversations as ShareGPT JSONL (one record per line)."""
  with open(path, "w", encoding="utf-8") as f:
    for c in conversations:
      f.write(json.dumps(c.to_sharegpt(), ensure_ascii=False) + "\n")
