"""The ratings database against bad input: an export never writes over what it reads, and a
file that is not a ratings database (a folder, empty, corrupt, another schema, a row of bad
JSON, a read-only mount) is one ``error:`` line, with the ratings left as they were."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

from absl import flags
from helpers import REPO
import pytest

from astrollama_jax.commands import cli
from astrollama_jax.commands import feedback as feedback_cli
from astrollama_jax.errors import UserError
from astrollama_jax.feedback import datasets
from astrollama_jax.feedback.store import FeedbackStore

RATINGS = 5


def fill(path, n: int = RATINGS) -> str:
  """A ratings database of ``n`` ratings; its path."""
  store = FeedbackStore(path)
  for i in range(n):
    store.add(
      completion_id=f"c{i}",
      checkpoint="ckpt",
      model="m",
      messages=[{"role": "user", "content": f"Question {i}?"}],
      answer=f"Answer {i}.",
      rating=1 + i % 5,
      correction="Better." if i % 2 else None,
      tags=["t"],
      sampling={"temperature": 0.0},
    )
  store.close()
  return str(path)


def count(path) -> int:
  con = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # creates no -shm file
  try:
    return con.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
  finally:
    con.close()


def run(*args: str) -> str | None:
  """``feedback ARGS`` in this process: None when it succeeds, else its one ``error:`` line."""
  fv = flags.FlagValues()
  feedback_cli.define_flags(fv)
  argv = fv(["feedback", *args])
  try:
    cli.guard(feedback_cli.main, argv, fv)
  except SystemExit as e:
    message = str(e.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message
  return None


def test_export_never_writes_over_the_database(tmp_path):
  db = fill(tmp_path / "ratings.sqlite")
  before = open(db, "rb").read()
  os.symlink(db, tmp_path / "link.sqlite")
  os.link(db, tmp_path / "hard.sqlite")
  (tmp_path / "sub").mkdir()
  out = str(tmp_path / "sft.jsonl")
  for args, word in [
    ([f"--output={db}"], "ratings database"),
    ([f"--output={tmp_path / 'sub' / '..' / 'ratings.sqlite'}"], "ratings database"),
    ([f"--output={tmp_path / 'link.sqlite'}"], "ratings database"),
    ([f"--output={tmp_path / 'hard.sqlite'}"], "ratings database"),
    ([f"--output={db}-wal"], "ratings database"),
    ([f"--output={out}", f"--pairs={db}"], "--pairs"),
    ([f"--output={out}", f"--pairs={tmp_path / 'hard.sqlite'}"], "--pairs"),
    ([f"--output={out}", f"--pairs={out}"], "different files"),
  ]:
    error = run("export", f"--db={db}", *args)
    assert error is not None and word in error, (args, error)
  assert open(db, "rb").read() == before and count(db) == RATINGS
  assert sorted(os.listdir(tmp_path)) == ["hard.sqlite", "link.sqlite", "ratings.sqlite", "sub"]
  # the library refuses too, whoever calls it
  store = FeedbackStore(db, read_only=True)
  try:
    with pytest.raises(UserError, match="ratings database"):
      datasets.export(store, out, str(tmp_path / "hard.sqlite"))
  finally:
    store.close()
  assert count(db) == RATINGS


def test_export_writes_through_a_temporary_file_beside_its_target(tmp_path):
  db = fill(tmp_path / "ratings.sqlite")
  out, pairs = tmp_path / "out" / "sft.jsonl", tmp_path / "out" / "p.jsonl"
  out.parent.mkdir()
  out.write_text("old\n")
  (out.parent / "sft.jsonl.tmp").write_text("someone else's file\n")
  assert run("export", f"--db={db}", f"--output={out}", f"--pairs={pairs}") is None
  assert sorted(os.listdir(out.parent)) == ["p.jsonl", "sft.jsonl", "sft.jsonl.tmp"]
  assert (out.parent / "sft.jsonl.tmp").read_text() == "someone else's file\n"
  assert len(out.read_text().splitlines()) > 0 and out.read_text() != "old\n"
  assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _other_schema(path) -> None:
  con = sqlite3.connect(path)
  con.execute("CREATE TABLE ratings (id INTEGER PRIMARY KEY, stars REAL)")
  con.commit()
  con.close()


def _other_program(path) -> None:
  con = sqlite3.connect(path)
  con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
  con.commit()
  con.close()


def _corrupt(path) -> None:
  fill(path)
  data = bytearray(open(path, "rb").read())
  data[:16] = b"not sqlite, no!\0"
  open(path, "wb").write(bytes(data))


def test_what_is_not_a_ratings_database_is_one_line_and_stays_as_it_was(tmp_path):
  makers = {
    "folder": lambda p: os.mkdir(p),
    "corrupt": _corrupt,
    "other_schema": _other_schema,
    "other_program": _other_program,
    "empty": lambda p: open(p, "wb").close(),
  }
  for name, make in makers.items():
    path = tmp_path / name
    make(path)
    snapshot = sorted(os.listdir(tmp_path))
    contents = None if os.path.isdir(path) else open(path, "rb").read()
    out = tmp_path / f"{name}.jsonl"
    for args in (["stats"], ["export", f"--output={out}"]):
      error = run(*args, f"--db={path}")
      assert error is not None and str(path) in error, (name, args, error)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == snapshot, name
    if name == "empty":
      assert "empty" in error and os.path.getsize(path) == 0
      FeedbackStore(path).close()  # the server may make it its database (and logs that it does)
      assert count(path) == 0
      continue
    # the server (--feedback_db) refuses it before loading a model: one line too
    with pytest.raises(SystemExit, match=f"^error: ratings database {path}"):
      cli.guard(FeedbackStore, path)
    if contents is not None:
      assert open(path, "rb").read() == contents, name
    assert sorted(os.listdir(tmp_path)) == snapshot, name


def test_a_row_that_is_not_json_is_named(tmp_path):
  db = fill(tmp_path / "ratings.sqlite")
  con = sqlite3.connect(db)
  con.execute('UPDATE ratings SET messages = \'[{"role": "user", \' WHERE id = 3')
  con.commit()
  con.close()
  for args in (["stats"], ["export", f"--output={tmp_path / 'sft.jsonl'}"]):
    error = run(*args, f"--db={db}")
    assert error is not None and "rating 3" in error and "messages" in error, error
  assert not (tmp_path / "sft.jsonl").exists()


def test_reading_never_writes_the_database(tmp_path):
  db = fill(tmp_path / "ratings.sqlite")
  con = sqlite3.connect(db)
  con.execute("PRAGMA user_version=0")  # a database from before the version was recorded
  con.commit()
  con.close()
  before = open(db, "rb").read()
  assert run("stats", f"--db={db}") is None
  assert open(db, "rb").read() == before


def _can_mount_read_only(folder) -> bool:
  if shutil.which("unshare") is None:
    return False
  probe = subprocess.run(
    ["unshare", "-rm", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}'"],
    capture_output=True,
  )
  return probe.returncode == 0


def test_a_database_on_a_read_only_mount(tmp_path):
  """Export and stats read it; the server says it cannot write there (one line each)."""
  ro, out = tmp_path / "ro", tmp_path / "out"
  ro.mkdir()
  out.mkdir()
  if not _can_mount_read_only(ro):
    pytest.skip("no unshare: cannot mount a folder read-only here")
  db = fill(ro / "ratings.sqlite")
  assert sorted(os.listdir(ro)) == ["ratings.sqlite"]
  py = f"'{sys.executable}' -m astrollama_jax"
  script = (
    f"mount --bind -o ro '{ro}' '{ro}' && cd '{REPO}' && "
    f"{py} feedback export --db='{db}' --output='{out}/sft.jsonl' && "
    f"{py} feedback stats --db='{db}' && "
    f"{py} serve --checkpoint='{tmp_path}/none' --feedback_db='{ro}/new.sqlite'"
  )
  proc = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "not writable" in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(out)) == ["sft.jsonl", "sft.pairs.jsonl"]
  assert len((out / "sft.jsonl").read_text().splitlines()) > 0
  assert '"ratings": 5' in proc.stdout
  assert sorted(os.listdir(ro)) == ["ratings.sqlite"] and count(db) == RATINGS
