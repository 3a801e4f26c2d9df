"""Ratings -> training data: corrected conversations for SFT, (chosen, rejected) pairs for
preference training, and counts per tag and per checkpoint.

* SFT (ShareGPT JSONL, what ``config.data.sft.sources`` reads): every rated answer that an expert
  corrected, with the correction in place of the model's answer, plus every uncorrected answer
  rated at least ``min_rating``, as it was. Low-rated uncorrected answers are left out: they
  say what not to do, which SFT cannot learn from.
* Pairs (JSONL in the conversational preference format: ``prompt`` as messages, ``chosen`` and
  ``rejected`` as one assistant message each): a correction beats the answer it corrects, and
  of two uncorrected answers to the same conversation the higher-rated one beats the lower.

Only an answer's newest rating counts: an expert who rates again replaces their verdict.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
import datetime
import itertools
import json
import os
import tempfile
from typing import Any

from astrollama_jax.data.chat_formats import (
  ASSISTANT,
  Conversation,
  write_sharegpt_jsonl,
)
from astrollama_jax.errors import UserError
from astrollama_jax.feedback.store import FeedbackStore


def parse_since(text: str | None) -> str | None:
  """A date or date-time (ISO 8601; UTC unless it says otherwise) in the store's time format."""
  if not text:
    return None
  try:
    when = datetime.datetime.fromisoformat(text)
  except ValueError:
    raise ValueError(
      f"--since {text!r} is not an ISO date or date-time (e.g. 2024-05-01 or 2024-05-01T12:00)"
    ) from None
  if when.tzinfo is None:
    when = when.replace(tzinfo=datetime.timezone.utc)
  return when.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")


def final_answer(row: dict[str, Any]) -> str:
  return row["correction"] if row["correction"] else row["answer"]


def conversation(row: dict[str, Any], answer: str) -> Conversation:
  """The rated conversation, ending with ``answer`` in place of the model's last answer."""
  messages = row["messages"]
  system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
  turns = tuple((m["role"], m["content"]) for m in messages if m["role"] != "system")
  return Conversation(turns=turns + ((ASSISTANT, answer),), system=system, id=f"rating-{row['id']}")


def sft_conversations(rows: Iterable[dict[str, Any]], min_rating: int) -> list[Conversation]:
  return [
    conversation(r, final_answer(r)) for r in rows if r["correction"] or r["rating"] >= min_rating
  ]


def _pair(
  row_chosen: dict, chosen: str, rating_chosen: int | None, row_rejected: dict, source: str
) -> dict[str, Any]:
  return {
    "id": f"rating-{row_chosen['id']}-vs-{row_rejected['id']}",
    "prompt": row_chosen["messages"],
    "chosen": [{"role": "assistant", "content": chosen}],
    "rejected": [{"role": "assistant", "content": row_rejected["answer"]}],
    "chosen_rating": rating_chosen,
    "rejected_rating": row_rejected["rating"],
    "source": source,
    "checkpoint": row_rejected["checkpoint"],
  }


def preference_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  pairs = [
    _pair(r, r["correction"], None, r, "correction")
    for r in rows
    if r["correction"] and r["correction"].strip() != r["answer"].strip()
  ]
  by_prompt: dict[str, list[dict]] = collections.defaultdict(list)
  for r in rows:
    if not r["correction"]:
      by_prompt[json.dumps(r["messages"], sort_keys=True)].append(r)
  for group in by_prompt.values():
    for a, b in itertools.combinations(group, 2):
      hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
      if hi["rating"] > lo["rating"] and hi["answer"].strip() != lo["answer"].strip():
        pairs.append(_pair(hi, hi["answer"], hi["rating"], lo, "ratings"))
  return pairs


def _same_file(a: str, b: str) -> bool:
  """Whether two paths name one file: the same resolved path, or (existing) the same inode,
  so a symbolic or hard link to the database counts as the database."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_outputs(db: str, outputs: dict[str, str]) -> None:
  """Refuse an output that is the ratings database (or its -wal, -shm or -journal file) or
  another output: an export must never write over what it reads. ``outputs``: flag -> path."""
  inputs = [db] + [db + suffix for suffix in ("-wal", "-shm", "-journal")]
  for flag, path in outputs.items():
    for name in inputs:
      if _same_file(path, name):
        raise UserError(f"{flag} {path} is the ratings database {name}; give a new file")
  (flag_a, a), (flag_b, b) = list(outputs.items())[:2]
  if _same_file(a, b):
    raise UserError(f"{flag_a} and {flag_b} must be different files, both are {a}")


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
  """Write through a temporary file beside ``path`` (same folder, so ``os.replace`` is atomic):
  a crash never leaves half an export behind nor touches any other file."""
  folder, name = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an export is an ordinary file
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def export(
  store: FeedbackStore,
  output: str,
  pairs_output: str,
  min_rating: int = 4,
  since: str | None = None,
) -> dict[str, Any]:
  """Write both files; return what went into them."""
  if not 1 <= min_rating <= 5:
    raise ValueError(f"--min_rating must be 1 to 5, got {min_rating}")
  check_outputs(store.path, {"--output": output, "--pairs": pairs_output})
  rows = store.rows(since=parse_since(since), latest_per_answer=True)
  convs = sft_conversations(rows, min_rating)
  pairs = preference_pairs(rows)
  for path in (output, pairs_output):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _write_atomically(output, lambda p: write_sharegpt_jsonl(p, convs))

  def write_pairs(p: str) -> None:
    with open(p, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)

  _write_atomically(pairs_output, write_pairs)
  return {
    "ratings": len(rows),
    "conversations": len(convs),
    "corrected": sum(1 for r in rows if r["correction"]),
    "kept_as_rated": sum(1 for r in rows if not r["correction"] and r["rating"] >= min_rating),
    "pairs": len(pairs),
    "output": output,
    "pairs_output": pairs_output,
    "min_rating": min_rating,
    "since": parse_since(since),
  }


def _summarise(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
  rows = list(rows)
  counts = collections.Counter(r["rating"] for r in rows)
  return {
    "ratings": len(rows),
    "mean_rating": round(sum(r["rating"] for r in rows) / len(rows), 3),
    "corrected": sum(1 for r in rows if r["correction"]),
    **{f"r{k}": counts.get(k, 0) for k in range(1, 6)},
  }


def stats(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(per tag, per checkpoint) rows: count, mean rating, corrected, how many of each score."""
  by_tag: dict[str, list] = collections.defaultdict(list)
  by_ckpt: dict[str, list] = collections.defaultdict(list)
  for r in rows:
    for tag in r["tags"] or ["(no tag)"]:
      by_tag[tag].append(r)
    by_ckpt[r["checkpoint"]].append(r)
  tags = [{"tag": t, **_summarise(rs)} for t, rs in sorted(by_tag.items())]
  ckpts = [{"checkpoint": c, **_summarise(rs)} for c, rs in sorted(by_ckpt.items())]
  return tags, ckpts
