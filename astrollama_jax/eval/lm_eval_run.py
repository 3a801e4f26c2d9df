"""lm-evaluation-harness runs of our ``astrollama`` model: its tasks, its run, our result file.

lm-eval's ``simple_evaluate`` with the model class of ``eval/lm_eval_model.py``. The tasks are
lm-eval's own, the astronomy tasks shipped in ``eval/tasks`` (always included) and any folders of
YAMLs the caller adds. Process 0 writes lm-eval's results file (as ``lm_eval --output_path``) and
``harness.json``: the same numbers in the shape of our eval results (``task``, ``label``,
``checkpoint``, ``metrics`` {"<task>/<metric>": number}, ``rows``, ``files``), so
``eval --compare`` reads it next to our own tasks. The ``harness`` command is its command line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import json
import os
import pathlib
from typing import Any

from astrollama_jax.errors import UserError
from astrollama_jax.util import tables

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
RESULT_FILE = "harness.json"
_COUNTS = ("sample_len", "sample_count")  # lm-eval's document counts, not metrics


def task_manager(include_paths: Sequence[str] = (), include_defaults: bool = True):
  """lm-eval's TaskManager over ours and ``include_paths`` (each must be a folder), and with
  ``include_defaults`` lm-eval's own tasks (indexing them takes most of a minute)."""
  from lm_eval.tasks import TaskManager

  for path in include_paths:
    if not os.path.isdir(path):
      raise UserError(f"--include_path {path} is not a folder")
  return TaskManager(include_path=[TASKS_DIR, *include_paths], include_defaults=include_defaults)


def resolve_tasks(manager, names: Sequence[str]) -> list[str]:
  """The names (glob patterns expanded, YAML paths kept); an unknown one is a ``UserError``."""
  out, unknown = [], []
  for name in names:
    matched = manager.match_tasks([name])
    if matched:
      out += [m for m in matched if m not in out]
    elif os.path.isfile(name) and name.endswith((".yaml", ".yml")):
      out.append(name)
    else:
      unknown.append(name)
  if unknown:
    raise UserError(
      f"unknown lm-eval task(s): {', '.join(unknown)} (`lm_eval ls tasks` "
      f"lists them; add a folder of YAMLs with --include_path)"
    )
  return out


def manager_and_tasks(names: Sequence[str], include_paths: Sequence[str] = ()):
  """(TaskManager, resolved names): ours and ``include_paths`` first, which index at once;
  lm-eval's own index only for a name not found there or a glob pattern (which may match
  lm-eval's tasks too)."""
  if not any(c in name for name in names for c in "*?["):
    manager = task_manager(include_paths, include_defaults=False)
    try:
      return manager, resolve_tasks(manager, names)
    except UserError:
      pass
  manager = task_manager(include_paths)
  return manager, resolve_tasks(manager, names)


@contextlib.contextmanager
def datasets_cache(folder: str) -> Iterator[str]:
  """HF datasets' cache in ``folder`` while the tasks load: lm-eval's ``load_dataset`` calls
  name no cache, and datasets would write under ``~/.cache/huggingface`` otherwise."""
  from datasets import config

  names = ("HF_DATASETS_CACHE", "DOWNLOADED_DATASETS_PATH", "EXTRACTED_DATASETS_PATH")
  saved = {name: getattr(config, name) for name in names}
  root = pathlib.Path(os.path.abspath(folder))
  config.HF_DATASETS_CACHE = root
  config.DOWNLOADED_DATASETS_PATH = root / config.DOWNLOADED_DATASETS_DIR
  config.EXTRACTED_DATASETS_PATH = config.DOWNLOADED_DATASETS_PATH / config.EXTRACTED_DATASETS_DIR
  try:
    yield str(root)
  finally:
    for name, value in saved.items():
      setattr(config, name, value)


def _data_errors() -> tuple[type[BaseException], ...]:
  """What reading a task's data raises when the file is missing, empty or malformed."""
  import datasets
  import jinja2
  import pyarrow

  return (
    StopIteration,  # datasets' json reader on an empty file
    datasets.exceptions.DatasetsError,
    pyarrow.ArrowException,
    jinja2.TemplateError,  # a record without the fields the task's templates use
    OSError,
    ValueError,
  )


def _why(error: BaseException) -> str:
  if isinstance(error, StopIteration):
    return "no records (an empty file?)"
  from datasets.exceptions import DatasetsError

  cause = error.__cause__ or error.__context__
  if isinstance(error, DatasetsError) and cause is not None:
    error = cause  # "An error occurred while generating the dataset" says less than its cause
  return str(error).strip() or type(error).__name__


def load_tasks(manager, names: Sequence[str]) -> list[Any]:
  """lm-eval's Task and Group objects of ``names``, their data read now, before any model is
  loaded: a missing, empty or malformed data file is a ``UserError`` naming the task and file."""
  built: list[Any] = []
  for name in names:
    try:
      loaded = manager.load([name])
    except _data_errors() as e:
      entry = manager.task_index.get(name)
      files = ((entry.cfg if entry else None) or {}).get("dataset_kwargs", {}).get("data_files")
      where = f" ({json.dumps(files)}, relative to {os.getcwd()})" if files else ""
      raise UserError(f"lm-eval task {name}: cannot read its data{where}: {_why(e)}") from None
    children = {c for kids in (loaded.get("group_map") or {}).values() for c in kids}
    built += [g for n, g in loaded["groups"].items() if n not in children]
    built += [t for n, t in loaded["tasks"].items() if n not in children]
  return built


def flat_metrics(results: dict) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """lm-eval's ``results`` -> {"<task>/<metric>[/<filter>]": value} with 95% bounds from the
  stderr (``_lo``/``_hi``, which ``--compare`` draws), and one table row per metric."""
  metrics, rows = {}, []
  for task, values in results.get("results", {}).items():
    for key, value in sorted(values.items()):
      metric, _, filt = key.partition(",")
      if (
        metric.endswith("_stderr")
        or metric in _COUNTS
        or not isinstance(value, (int, float))
        or isinstance(value, bool)
      ):
        continue
      name = f"{task}/{metric}" + ("" if filt in ("", "none") else f"/{filt}")
      stderr = values.get(f"{metric}_stderr,{filt}")
      stderr = stderr if isinstance(stderr, (int, float)) else None
      metrics[name] = value
      if stderr is not None:
        metrics[f"{name}_lo"], metrics[f"{name}_hi"] = value - 1.96 * stderr, value + 1.96 * stderr
      rows.append(
        {
          "task": task,
          "metric": metric,
          "filter": filt,
          "n-shot": results.get("n-shot", {}).get(task),
          "value": value,
          "stderr": stderr,
        }
      )
  return metrics, rows


def write_result(
  output: str, label: str, checkpoint: str, results: dict, files: dict[str, str]
) -> dict:
  """``<output>/harness.json`` in the shape of ``eval.common.finish`` (read by ``--compare``)."""
  metrics, rows = flat_metrics(results)
  path = os.path.join(output, RESULT_FILE)
  summary = tables.jsonable(
    {
      "task": "harness",
      "label": label,
      "checkpoint": checkpoint,
      "metrics": metrics,
      "rows": rows,
      "files": {"result": path, **files},
    }
  )
  os.makedirs(output, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  os.replace(path + ".tmp", path)
  return summary


def evaluate(
  lm,
  tasks: Sequence[Any],
  manager,
  *,
  output: str | None,
  label: str,
  num_fewshot: int | None = None,
  limit: int | float | None = None,
  seed: int = 0,
  bootstrap_iters: int = 100000,
  log_samples: bool = False,
) -> dict:
  """``simple_evaluate`` of ``lm`` on ``tasks`` (names, or ``load_tasks``'s objects); process 0
  writes lm-eval's results file(s) under ``output``. Returns lm-eval's results dict
  (``files``: what was written)."""
  from lm_eval import simple_evaluate
  from lm_eval.loggers import EvaluationTracker

  from astrollama_jax.eval import common

  tracker = EvaluationTracker(output_path=output) if output and common.is_writer() else None
  results = simple_evaluate(
    model=lm,
    model_args={"model": label},
    tasks=list(tasks),
    num_fewshot=num_fewshot,
    limit=limit,
    task_manager=manager,
    evaluation_tracker=tracker,
    log_samples=log_samples,
    bootstrap_iters=bootstrap_iters,
    random_seed=seed,
    numpy_random_seed=seed,
    torch_random_seed=seed,
    fewshot_random_seed=seed,
  )
  samples = results.pop("samples", None)
  results["config"]["model"] = "astrollama"
  files = {}
  if tracker is not None:
    tracker.save_results_aggregated(results=results, samples=samples)
    folder = os.path.join(output, tracker.general_config_tracker.model_name_sanitized)
    files["lm_eval"] = os.path.join(folder, f"results_{tracker.date_id}.json")
    if samples:
      for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
      files["samples"] = folder
  results["files"] = files
  return results


def import_model_class():
  """``AstroLlamaLM``, or a ``UserError`` saying how to install lm-eval when it is missing."""
  try:
    from astrollama_jax.eval.lm_eval_model import AstroLlamaLM
  except ImportError as e:
    if (e.name or "").split(".")[0] != "lm_eval":
      raise
    raise UserError(
      'lm-evaluation-harness is not installed: pip install "lm-eval==0.4.13"'
    ) from None
  return AstroLlamaLM
