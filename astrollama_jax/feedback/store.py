"""Expert ratings in SQLite: one row per rating, committed before the server answers.

WAL mode with ``synchronous=FULL``: a rating the page was told is saved survives the server
being killed (or the machine losing power) at any moment after, and readers (``feedback export``
while the server runs) never block the writer. Each row is self-contained (the whole
conversation, the rated answer, the checkpoint, the sampling settings and the time), so export
needs nothing but the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import datetime
import json
import os
import sqlite3
import threading
from typing import Any

SCHEMA_VERSION = 1
MAX_TAGS = 12
MAX_TAG_CHARS = 48

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
  id            INTEGER PRIMARY KEY AUTOINCREMENT,
  created_at    TEXT NOT NULL,     -- UTC, ISO 8601 (sorts as time)
  completion_id TEXT NOT NULL,     -- the answer rated (an answer may be rated again)
  checkpoint    TEXT NOT NULL,
  model         TEXT NOT NULL,
  messages      TEXT NOT NULL,     -- JSON [{role, content}]: system?, user, assistant, ..., user
  answer        TEXT NOT NULL,     -- the model's answer to the last user message
  rating        INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
  correction    TEXT,              -- the expert's answer, NULL when none
  tags          TEXT NOT NULL,     -- JSON list of strings
  sampling      TEXT NOT NULL,     -- JSON: max_tokens, temperature, top_p, top_k, seed, stop
  comment       TEXT
);
CREATE INDEX IF NOT EXISTS ratings_created ON ratings (created_at);
"""


class RatingError(ValueError):
  """A rating that cannot be stored; ``field`` names the part at fault (for the API's 400)."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def _text(field: str, value: Any) -> None:
  """Refuse a string SQLite cannot store: JSON can carry a lone surrogate, UTF-8 cannot."""
  for s in value if isinstance(value, (list, tuple)) else [value]:
    if isinstance(s, str):
      try:
        s.encode("utf-8")
      except UnicodeEncodeError:
        raise RatingError(
          field, f"{field} holds a lone surrogate (such as \\ud800): text must be valid UTF-8"
        ) from None


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def normalise_tags(tags: Sequence[Any]) -> list[str]:
  """Lower-case, trimmed, unique tags in their order; a ValueError names a bad one."""
  out: list[str] = []
  for tag in tags:
    if not isinstance(tag, str) or not tag.strip() or len(tag.strip()) > MAX_TAG_CHARS:
      raise RatingError(
        "tags",
        f"a tag must be a non-empty string of at most {MAX_TAG_CHARS} characters, got {tag!r}",
      )
    tag = " ".join(tag.strip().lower().split())
    if tag not in out:
      out.append(tag)
  if len(out) > MAX_TAGS:
    raise RatingError("tags", f"at most {MAX_TAGS} tags, got {len(out)}")
  return out


class FeedbackStore:
  """The ratings file. Thread-safe (one connection, one lock: writes are a few hundred bytes)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(parent, exist_ok=True)
    self._lock = threading.Lock()
    self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
    self._db.row_factory = sqlite3.Row
    mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
      raise ValueError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
    self._db.execute("PRAGMA synchronous=FULL")
    version = self._db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
      raise ValueError(
        f"{self.path}: ratings schema version {version}, this code reads {SCHEMA_VERSION}"
      )
    self._db.executescript(_SCHEMA)
    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def add(
    self,
    *,
    completion_id: str,
    checkpoint: str,
    model: str,
    messages: list[dict[str, str]],
    answer: str,
    rating: int,
    correction: str | None,
    tags: Sequence[str],
    sampling: dict[str, Any],
    comment: str | None = None,
    created_at: str | None = None,
  ) -> dict[str, Any]:
    """Insert one rating (committed when this returns) and return it as stored."""
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
      raise RatingError("rating", f"rating must be an integer from 1 to 5, got {rating!r}")
    for field, value in (("correction", correction), ("comment", comment), ("tags", list(tags))):
      _text(field, value)
    correction = correction if correction and correction.strip() else None
    row = (
      created_at or utc_now(),
      completion_id,
      checkpoint,
      model,
      json.dumps(messages, ensure_ascii=False),
      answer,
      rating,
      correction,
      json.dumps(normalise_tags(tags), ensure_ascii=False),
      json.dumps(sampling, ensure_ascii=False),
      comment or None,
    )
    with self._lock:
      cur = self._db.execute(
        "INSERT INTO ratings (created_at, completion_id, checkpoint, model, messages, answer, "
        "rating, correction, tags, sampling, comment) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        row,
      )
      rid = cur.lastrowid
    return self.get(rid)

  def get(self, rid: int) -> dict[str, Any]:
    with self._lock:
      row = self._db.execute("SELECT * FROM ratings WHERE id = ?", (rid,)).fetchone()
    if row is None:
      raise KeyError(rid)
    return _as_dict(row)

  def rows(
    self,
    since: str | None = None,
    latest_per_answer: bool = False,
    limit: int | None = None,
    newest_first: bool = False,
  ) -> list[dict[str, Any]]:
    """Ratings in time order (``since``: created at or after that ISO time).

    ``latest_per_answer`` keeps only the newest rating of each answer: an expert who changes
    their mind replaces their earlier verdict.
    """
    sql, args = "SELECT * FROM ratings", []
    if since:
      sql, args = sql + " WHERE created_at >= ?", [since]
    if latest_per_answer:
      sql += (" AND" if since else " WHERE") + (
        " id IN (SELECT MAX(id) FROM ratings GROUP BY completion_id)"
      )
    sql += " ORDER BY id" + (" DESC" if newest_first else "")
    if limit is not None:
      sql, args = sql + " LIMIT ?", args + [int(limit)]
    with self._lock:
      return [_as_dict(r) for r in self._db.execute(sql, args).fetchall()]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.rows())


def _as_dict(row: sqlite3.Row) -> dict[str, Any]:
  out = dict(row)
  for key in ("messages", "tags", "sampling"):
    out[key] = json.loads(out[key])
  return out


def open_existing(path: str) -> FeedbackStore:
  """A store that must exist already (the export and stats commands never create one)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--db {path} does not exist")
  return FeedbackStore(path)
