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
import urllib.parse

from absl import logging

from astrollama_jax.errors import UserError

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
COLUMNS = frozenset(
  "id created_at completion_id checkpoint model messages answer rating correction tags "
  "sampling comment".split()
)


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
  """The ratings file. Thread-safe (one connection, one lock: writes are a few hundred bytes).

  ``read_only`` (export, stats) opens the file as it is: nothing is created, migrated or
  written, so a database on a read-only mount can be read. Anything that is not a ratings
  database (a folder, an empty or corrupt file, another program's tables, another schema)
  is a ``UserError`` naming the file, before any rating is read or written.
  """

  def __init__(self, path: str | os.PathLike, read_only: bool = False):
    self.path = os.fspath(path)
    self.read_only = read_only
    self._lock = threading.Lock()
    self._db: sqlite3.Connection | None = None
    if os.path.isdir(self.path):
      raise UserError(f"ratings database {self.path} is a folder; give a file path")
    try:
      self._db = self._connect_read_only() if read_only else self._connect()
      self._db.row_factory = sqlite3.Row
      self._check_schema()
      if not read_only:
        self._start_writing()
    except BaseException as e:
      if self._db is not None:
        self._db.close()
      if isinstance(e, sqlite3.DatabaseError):
        raise UserError(f"ratings database {self.path}: {_reason(e)}") from None
      raise

  def _connect(self) -> sqlite3.Connection:
    """The writer's connection, after checking the file can be written."""
    folder = os.path.dirname(os.path.abspath(self.path))
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      raise UserError(
        f"ratings database {self.path}: cannot create {folder}: {e.strerror}"
      ) from None
    if not os.access(folder, os.W_OK) or (
      os.path.exists(self.path) and not os.access(self.path, os.W_OK)
    ):
      raise UserError(
        f"ratings database {self.path} is not writable (the server writes the file and "
        "its -wal and -shm files beside it)"
      )
    if os.path.isfile(self.path) and os.path.getsize(self.path) == 0:
      logging.warning(
        "ratings database %s is an empty file: making it a ratings database", self.path
      )
    self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
    return self._db

  def _start_writing(self) -> None:
    """WAL and full sync, then the schema: only once the file is known to be ours."""
    mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
      raise ValueError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})")
    self._db.execute("PRAGMA synchronous=FULL")
    self._db.executescript(_SCHEMA)
    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

  def _connect_read_only(self) -> sqlite3.Connection:
    """A connection that never writes. With no -wal file beside the database (no server has it
    open, or it closed cleanly), ``immutable``: SQLite then creates no file either. With one,
    ``mode=ro`` reads the ratings still in it, which needs the -shm file SQLite keeps there."""
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"ratings database {self.path} does not exist")
    if os.path.getsize(self.path) == 0:
      raise UserError(f"ratings database {self.path} is an empty file, not a ratings database")
    uri = "file:" + urllib.parse.quote(os.path.abspath(self.path))
    wal = self.path + "-wal"
    if os.path.exists(wal):
      db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, timeout=30)
      try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        self._db = db
        return db
      except sqlite3.OperationalError as e:
        db.close()
        if "unable to open" not in str(e):
          raise
      if os.path.getsize(wal) > 0:  # a read-only folder: no -shm can be made beside it
        raise UserError(
          f"ratings database {self.path}: cannot be read here: {wal} holds ratings not yet "
          "merged, and SQLite cannot write the shared-memory file it needs beside it "
          "(copy the database with its -wal file to a writable folder)"
        )
    db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    self._db = db
    return db

  def _check_schema(self) -> None:
    """Refuse another schema version, another ``ratings`` table or another program's tables."""
    version = self._db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
      raise UserError(
        f"ratings database {self.path}: schema version {version}, this code reads {SCHEMA_VERSION}"
      )
    tables = {
      r[0]
      for r in self._db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
      )
    }
    if "ratings" in tables:
      columns = {r[1] for r in self._db.execute("PRAGMA table_info(ratings)")}
      if columns != COLUMNS:
        raise UserError(
          f"ratings database {self.path}: its ratings table has another schema "
          f"(missing {sorted(COLUMNS - columns)}, unknown {sorted(columns - COLUMNS)})"
        )
    elif tables:
      raise UserError(
        f"ratings database {self.path} is another program's SQLite database "
        f"(tables: {', '.join(sorted(tables))}), not a ratings database"
      )
    elif self.read_only:
      raise UserError(f"ratings database {self.path} holds no ratings table")

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
    row = self._query("SELECT * FROM ratings WHERE id = ?", [rid])
    if not row:
      raise KeyError(rid)
    return self._as_dict(row[0])

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
    return [self._as_dict(r) for r in self._query(sql, args)]

  def _query(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
    """The rows of ``sql``; a damaged file is a ``UserError`` naming it, not a traceback."""
    try:
      with self._lock:
        return self._db.execute(sql, args).fetchall()
    except sqlite3.DatabaseError as e:
      raise UserError(f"ratings database {self.path}: {_reason(e)}") from None

  def _as_dict(self, row: sqlite3.Row) -> dict[str, Any]:
    """A row with its JSON columns decoded; a row that does not hold what ``add`` writes
    (edited by hand, another program) is a ``UserError`` naming it."""
    out = dict(row)
    for key, kind in (("messages", list), ("tags", list), ("sampling", dict)):
      try:
        out[key] = json.loads(out[key])
      except (TypeError, ValueError) as e:
        raise UserError(
          f"ratings database {self.path}: rating {out['id']}: {key} is not JSON ({e})"
        ) from None
      if not isinstance(out[key], kind):
        raise UserError(
          f"ratings database {self.path}: rating {out['id']}: {key} is not a JSON {kind.__name__}"
        )
    if not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in out["messages"]
    ):
      raise UserError(
        f"ratings database {self.path}: rating {out['id']}: messages must be "
        '[{"role": ..., "content": ...}, ...]'
      )
    return out

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.rows())


def _reason(error: sqlite3.DatabaseError) -> str:
  """SQLite's words for what is wrong with the file, with a hint for the usual case."""
  text = str(error)
  if "not a database" in text or "malformed" in text:
    return f"not a readable SQLite ratings database ({text})"
  return text


def open_existing(path: str) -> FeedbackStore:
  """A store that must exist already, read-only (the export and stats commands never create,
  migrate or write one)."""
  return FeedbackStore(path, read_only=True)
