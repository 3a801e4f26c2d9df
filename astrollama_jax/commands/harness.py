"""``python -m astrollama_jax harness``: lm-evaluation-harness tasks on an astrollama-jax model.

  python -m astrollama_jax harness --checkpoint=runs/cpt --tasks=astro_mcq,astro_ph_abstracts \\
      --num_fewshot=5 --output=eval/cpt

Runs lm-eval's ``simple_evaluate`` with our ``astrollama`` model class (``eval/lm_eval_run.py``,
``eval/lm_eval_model.py``): scoring and generation on the mesh, multi-host. The tasks are
lm-eval's own, the astronomy tasks shipped in ``astrollama_jax/eval/tasks`` (always included),
and any YAMLs under ``--include_path``. Writes, on process 0 only:

* ``<output>/<label>/results_<time>.json``: lm-eval's results file (as ``lm_eval --output_path``),
  and with ``--log_samples`` its per-document samples beside it;
* ``<output>/harness.json``: the same numbers in the shape of our eval results
  (``task``, ``label``, ``checkpoint``, ``metrics`` {"<task>/<metric>": number}, ``rows``,
  ``files``), so ``python -m astrollama_jax eval --compare`` reads it next to our own tasks.

Every process reads the tasks' data before the model loads (a missing, empty or malformed file
is one error line) through HF datasets' cache in ``<output>/datasets_cache`` (or
``--datasets_cache``, or ``$HF_DATASETS_CACHE``), never in the home folder unless named.

Prints lm-eval's table, then one JSON line holding lm-eval's ``results``.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os

from absl import flags, logging

from astrollama_jax.commands import cli
from astrollama_jax.errors import UserError
from astrollama_jax.eval import lm_eval_run
from astrollama_jax.util import checks, tables


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags (defined when the command runs, never on import)."""
  fv = {"flag_values": flag_values}
  cli.define(
    *cli.MODEL_FLAGS,
    "output",
    required=["checkpoint", "output"],
    flag_values=flag_values,
    help={"output": "Folder for lm-eval's results JSON and harness.json."},
  )
  flags.DEFINE_list(
    "tasks",
    None,
    "lm-eval task, group or tag names (or YAML paths), comma-separated; glob patterns allowed.",
    required=True,
    **fv,
  )
  flags.DEFINE_multi_string("include_path", [], "Folder of extra task YAMLs (repeatable).", **fv)
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: each task's own).", **fv)
  flags.DEFINE_float("limit", None, "Documents per task: a count, or a fraction if < 1.", **fv)
  flags.DEFINE_integer(
    "batch_size",
    8,
    "Rows of max_length tokens per scoring step; prompts per generation call.",
    **fv,
  )
  flags.DEFINE_integer("max_length", 0, "Context in tokens (0 = the model's max_seq_len).", **fv)
  flags.DEFINE_integer("max_gen_toks", 256, "Generation budget of tasks that set none.", **fv)
  flags.DEFINE_string("label", None, "Name of this run (default: the checkpoint's name).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of lm-eval's few-shot sampling and of sampling.", **fv)
  flags.DEFINE_integer(
    "bootstrap_iters",
    100000,
    "lm-eval's bootstrap resamples for the stderr of non-mean metrics (0 = none).",
    **fv,
  )
  flags.DEFINE_bool("log_samples", False, "Also write lm-eval's per-document samples.", **fv)
  flags.DEFINE_string(
    "datasets_cache",
    None,
    "Folder where HF datasets caches the tasks' data (default: $HF_DATASETS_CACHE if set, "
    "else <output>/datasets_cache; never ~/.cache unless named).",
    **fv,
  )
  flags.DEFINE_bool("progress", True, "Show progress bars.", **fv)
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed.initialize: "
    "auto = when the flags below or SLURM/OpenMPI/TPU-pod variables say there are "
    "several processes.",
    **fv,
  )
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host GPU).", **fv)
  flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --coordinator_address).", **fv
  )
  flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).", **fv)


def _limit(value: float | None) -> int | float | None:
  """``--limit`` as lm-eval takes it: a count of documents, or a fraction below 1."""
  if value is None:
    return None
  if value <= 0:
    raise UserError(f"--limit must be > 0, got {value}")
  return int(value) if value >= 1 and float(value).is_integer() else value


def main(argv: Sequence[str], F: flags.FlagValues = flags.FLAGS) -> None:
  cli.no_extra_args(argv)
  from astrollama_jax.train import distributed

  distributed.initialize(F.distributed, F.coordinator_address, F.num_processes, F.process_id)
  from astrollama_jax.eval import common

  AstroLlamaLM = lm_eval_run.import_model_class()
  checks.check_output_dir(F.output, empty=False)
  limit = _limit(F.limit)
  manager, tasks = lm_eval_run.manager_and_tasks(F.tasks, F.include_path)
  cache = F.datasets_cache or os.environ.get("HF_DATASETS_CACHE")
  with lm_eval_run.datasets_cache(cache or os.path.join(F.output, "datasets_cache")):
    loaded = lm_eval_run.load_tasks(manager, tasks)
    label = F.label or common.default_label(F.checkpoint)
    model = common.load(F.checkpoint, F.mesh, F.dtype, F.compute_dtype, F.tokenizer, F.attention)
    lm = AstroLlamaLM(
      model=model,
      batch_size=F.batch_size,
      max_length=F.max_length or None,
      max_gen_toks=F.max_gen_toks,
      progress=F.progress,
    )
    logging.info("lm-eval tasks: %s", ", ".join(tasks))
    results = lm_eval_run.evaluate(
      lm,
      loaded,
      manager,
      output=F.output,
      label=label,
      num_fewshot=F.num_fewshot,
      limit=limit,
      seed=F.seed,
      bootstrap_iters=F.bootstrap_iters,
      log_samples=F.log_samples,
    )
  if not common.is_writer():
    return
  files = results.pop("files")
  ours = lm_eval_run.write_result(F.output, label, F.checkpoint, results, files)
  from lm_eval.utils import make_table

  print(
    f"astrollama ({label}), limit: {limit}, num_fewshot: {F.num_fewshot}, "
    f"batch_size: {F.batch_size}"
  )
  print(make_table(results))
  if "groups" in results:
    print(make_table(results, "groups"))
  summary = {
    "label": label,
    "checkpoint": F.checkpoint,
    "results": results["results"],
    **({"groups": results["groups"]} if "groups" in results else {}),
    "files": ours["files"],
  }
  print(json.dumps(tables.jsonable(summary), ensure_ascii=False), flush=True)
