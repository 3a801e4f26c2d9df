"""What every eval task shares: loading the model, reading evaluation records, writing results.

Results of every task are one JSON file ``<output>/<task>.json`` with the same shape
(``task``, ``label``, ``checkpoint``, ``metrics`` {name: number}, ``rows`` for the table,
``files``), so ``--compare`` can put any set of runs side by side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import csv
import dataclasses
import json
import os
from typing import Any

import jax

from astrollama_jax import sharding
from astrollama_jax.checkpoints import loader
from astrollama_jax.errors import UserError
from astrollama_jax.util import checks, tables

TEXT_FIELDS = ("text", "abstract")


class EvalDataError(ValueError):
  """An evaluation file is not what it should be: names the file, line and problem."""


# A model ready to score: config (with the requested compute dtype), params on its mesh.
Model = loader.LoadedModel


def load(
  checkpoint: str,
  mesh_shape: str = sharding.DEFAULT_MESH,
  dtype: str | None = None,
  compute_dtype: str | None = None,
  tokenizer: str | None = None,
  attention: str | None = None,
) -> Model:
  """Load any checkpoint kind onto the mesh ``mesh_shape`` names (``loader.load_model``)."""
  return loader.load_model(
    checkpoint,
    sharding.mesh_from_text(mesh_shape),
    dtype=dtype,
    compute_dtype=compute_dtype,
    attention=attention,
    tokenizer=tokenizer,
    need_tokenizer=True,
  )


# --- evaluation records ---------------------------------------------------------------------


def split_specs(specs: Sequence[str] | str | None) -> list[str]:
  """``--data`` may be repeated and/or comma-separated."""
  if not specs:
    return []
  if isinstance(specs, str):
    specs = [specs]
  return [p.strip() for s in specs for p in s.split(",") if p.strip()]


def corpus_name(path: str) -> str:
  base = os.path.basename(os.path.normpath(path))
  for ext in (".jsonl", ".json", ".csv"):
    if base.endswith(ext):
      return base[: -len(ext)]
  return base


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, record) for every non-empty line; a bad line raises naming file and line."""
  if not os.path.isfile(path):
    raise EvalDataError(f"no such file: {path}")
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{n}: not JSON ({e.msg})") from None
      if not isinstance(rec, dict):
        raise EvalDataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
      try:
        checks.check_text(json.dumps(rec, ensure_ascii=False), f"{path}:{n}")
      except UserError as e:
        raise EvalDataError(str(e)) from None
      yield n, rec


def _decode(v: Any) -> Any:
  return v.decode("utf-8") if isinstance(v, bytes) else v


def read_texts(path: str, split: str = "validation", limit: int = 0) -> list[dict]:
  """Records {id, text, section?, title?, categories?, date?} from a JSONL file or a prepared
  dataset.

  JSONL: the text is the ``text`` field, else ``abstract``; ``date`` is kept as written. A
  directory is read as the prepared TFDS dataset (``astrollama_jax.commands.prepare``), split
  ``split``.
  """
  out = []
  if os.path.isdir(path):
    from astrollama_jax.data.corpus import read as corpus

    source = corpus.read_split(path, split)
    for i in range(len(source)):
      rec = {k: _decode(v) for k, v in source[i].items()}
      out.append(
        {
          "id": rec.get("id") or f"{i}",
          "text": rec["text"],
          "section": rec.get("section") or None,
          "title": rec.get("title"),
          "date": rec.get("date") or None,
        }
      )
      if limit and len(out) >= limit:
        break
    return out
  for n, rec in read_jsonl(path):
    field = next((f for f in TEXT_FIELDS if isinstance(rec.get(f), str)), None)
    if field is None:
      raise EvalDataError(f"{path}:{n}: no text field (expected one of {TEXT_FIELDS})")
    out.append(
      {
        "id": str(rec.get("id", f"{corpus_name(path)}:{n}")),
        "text": rec[field],
        "section": rec.get("section"),
        "title": rec.get("title"),
        "categories": rec.get("categories"),
        "date": rec.get("date"),
      }
    )
    if limit and len(out) >= limit:
      break
  return out


def read_csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
  if not os.path.isfile(path):
    raise EvalDataError(f"no such file: {path}")
  with open(path, encoding="utf-8", newline="") as f:
    for n, row in enumerate(csv.reader(f), 1):
      if row:
        yield n, row


# --- results ---------------------------------------------------------------------------------


def is_writer() -> bool:
  """Only the first process writes files and prints (every process computes the same results)."""
  return jax.process_index() == 0


def write_jsonl(path: str, records: Sequence[dict]) -> None:
  """Write records atomically (temp file + rename): a crash never leaves half a file."""
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(tables.jsonable(r), ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def finish(
  task: str,
  output_dir: str,
  label: str,
  checkpoint: str,
  metrics: dict,
  rows: Sequence[dict],
  items: Sequence[dict] | None = None,
  extra: dict | None = None,
  columns: Sequence[str] | None = None,
  *,
  files: dict | None = None,
  kind: str = "items",
) -> dict:
  """Write ``<output>/<task>.json``, print the table and the one JSON summary line; with
  ``items``, also a record per item in ``<output>/<task>_<kind>.jsonl``."""
  result_path = os.path.join(output_dir, f"{task}.json")
  files = dict(files or {})
  if items is not None:
    files[kind] = os.path.join(output_dir, f"{task}_{kind}.jsonl")
    write_jsonl(files[kind], items)
  summary = tables.jsonable(
    {
      "task": task,
      "label": label,
      "checkpoint": checkpoint,
      "metrics": metrics,
      "rows": list(rows),
      "files": {"result": result_path, **files},
      **(extra or {}),
    }
  )
  if not is_writer():
    return summary
  os.makedirs(output_dir, exist_ok=True)
  tmp = result_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  os.replace(tmp, result_path)
  tables.report(f"{task}: {label}", summary, rows or [], columns)
  return summary


def contamination_note(checker: Any, dropped: int) -> dict:
  """The summary's note of how many items the contamination ``checker`` (if any) dropped."""
  if checker is None:
    return {}
  return {
    "contamination": {"threshold": checker.threshold, "dropped": dropped, "drop": checker.drop}
  }


@dataclasses.dataclass(frozen=True)
class TaskSetup:
  """What every task runs with: the model, where and under which name it reports, and how much
  data it reads and scores at once."""

  model: Model
  tokenizer: Any
  output_dir: str
  label: str
  batch_size: int = 8
  max_len: int = 0  # 0: the model's context
  limit: int = 0  # items per data file (0: all)
  progress: bool = True

  def scorer(self):
    """The task's ``Scorer``, once the tokenizer is known to fit the model's vocabulary."""
    from astrollama_jax.eval.scoring import Scorer

    m = self.model
    self.tokenizer.check_vocab(m.cfg.vocab_size)
    return Scorer(
      m.cfg,
      m.params,
      m.mesh,
      batch_size=self.batch_size,
      max_len=self.max_len or None,
      progress=self.progress,
    )

  def finish(self, task: str, metrics: dict, rows: Sequence[dict], *args: Any, **kwargs: Any):
    """``finish`` with this setup's output folder, label and checkpoint."""
    return finish(
      task, self.output_dir, self.label, self.model.checkpoint, metrics, rows, *args, **kwargs
    )


def default_label(checkpoint: str) -> str:
  return os.path.basename(os.path.normpath(checkpoint)) if checkpoint else "model"
