"""The one command-line surface: console scripts, the flags commands share, errors, the summary.

Every entry point is an absl app started with ``cli.run(main)``:

* the flags several commands take (``--checkpoint``, ``--tokenizer``, ``--mesh``, ``--dtype``,
  ``--compute_dtype``, ``--attention``, ``--output``) are defined here, by ``define``, with one
  meaning and one default each;
* a problem the user can fix (a missing file, a bad flag value, an output that is not empty)
  ends the command with one ``error: ...`` line on stderr and exit status 1, no traceback;
  tracebacks are for bugs (``run``);
* every command closes with ``report``: a two-column table for people, then the same summary
  as one JSON line for scripts.

Console scripts (``astrollama-train`` ...) run their module exactly as ``python -m`` does: the
modules define their flags under ``if __name__ == "__main__"``, so importing one defines none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import json
import math
import os
import runpy
import traceback
from typing import Any

from absl import app, flags, logging

COMMANDS = {
  "prepare": "astrollama_jax.prepare",
  "train": "astrollama_jax.train",
  "convert": "astrollama_jax.convert",
  "export": "astrollama_jax.export",
  "generate": "astrollama_jax.generate",
  "chat": "astrollama_jax.chat",
  "eval": "astrollama_jax.eval",
  "harness": "astrollama_jax.harness",
  "bench": "astrollama_jax.bench",
  "aot": "astrollama_jax.aot",
  "make_qa": "astrollama_jax.make_qa",
  "demo": "astrollama_jax.demo",
  "serve": "astrollama_jax.serve",
  "feedback": "astrollama_jax.feedback",
}

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MESH = "1,-1,1"
# The flags every command that loads a model for inference takes: ``cli.define(*MODEL_FLAGS)``.
MODEL_FLAGS = ("checkpoint", "tokenizer", "mesh", "dtype", "compute_dtype", "attention")


class UserError(Exception):
  """A problem the user can fix; its message is the one line the command prints."""


def _attention_impls() -> tuple[str, ...]:
  from astrollama_jax.model.config import ATTENTION_IMPLS

  return ATTENTION_IMPLS


# name -> (absl definer, default, help); the one meaning and default of each shared flag.
def _shared() -> dict[str, tuple[Callable[..., Any], Any, str, dict[str, Any]]]:
  return {
    "checkpoint": (
      flags.DEFINE_string,
      None,
      "Model to load: HF folder, converted DIR, training WORKDIR or step folder.",
      {},
    ),
    "tokenizer": (
      flags.DEFINE_string,
      None,
      "SentencePiece tokenizer.model (default: the one beside the model).",
      {},
    ),
    "mesh": (
      flags.DEFINE_string,
      DEFAULT_MESH,
      "Device mesh data,fsdp,tensor; one entry may be -1: the rest of the devices.",
      {},
    ),
    "dtype": (
      flags.DEFINE_enum,
      None,
      "Parameter dtype (default: the dtype the checkpoint stores).",
      {"enum_values": DTYPES},
    ),
    "compute_dtype": (
      flags.DEFINE_enum,
      None,
      "Activation dtype (default: the parameters' dtype, so a float32 checkpoint "
      "computes in float32).",
      {"enum_values": DTYPES},
    ),
    "attention": (
      flags.DEFINE_enum,
      None,
      "Attention implementation (default: the model config's).",
      {"enum_values": _attention_impls()},
    ),
    "output": (flags.DEFINE_string, None, "Where the command writes its result.", {}),
  }


def define(
  *names: str,
  flag_values: flags.FlagValues = flags.FLAGS,
  required: Sequence[str] = (),
  help: Mapping[str, str] | None = None,
  defaults: Mapping[str, Any] | None = None,
) -> None:
  """Define the shared flags ``names`` on ``flag_values``.

  ``help`` may say what ``--output`` is for this command (a file, a folder); ``defaults`` is only
  for ``--output``'s default, since the other flags mean the same everywhere.
  """
  table = _shared()
  for name in names:
    if name not in table:
      raise KeyError(f"no shared flag {name!r}; shared flags: {sorted(table)}")
    definer, default, text, extra = table[name]
    if defaults and name in defaults:
      if name != "output":
        raise ValueError(f"--{name} has one default for every command")
      default = defaults[name]
    text = (help or {}).get(name, text)
    if "enum_values" in extra:
      definer(name, default, extra["enum_values"], text, flag_values=flag_values)
    else:
      definer(name, default, text, flag_values=flag_values)
  for name in required:
    flags.mark_flag_as_required(name, flag_values=flag_values)


def mesh_shape(text: str) -> tuple[int, int, int]:
  """``"data,fsdp,tensor"`` -> three ints (one may be -1); a bad value is a ``UserError``."""
  try:
    shape = tuple(int(x) for x in str(text).split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise UserError(
      f"--mesh must be data,fsdp,tensor: three positive integers, one of them may be "
      f"-1 (e.g. {DEFAULT_MESH}); got {text!r}"
    )
  return shape  # type: ignore[return-value]


def make_mesh(text: str = DEFAULT_MESH):
  """The device mesh a ``--mesh`` value names, over all of this job's devices."""
  from astrollama_jax import sharding

  try:
    return sharding.make_mesh(mesh_shape(text))
  except ValueError as e:
    raise UserError(f"--mesh={text}: {e}") from None


def load_model(
  checkpoint: str,
  mesh: Any = None,
  *,
  dtype: str | None = None,
  compute_dtype: str | None = None,
  attention: str | None = None,
  tokenizer: str | None = None,
):
  """Load any checkpoint for inference with the shared flags' meaning.

  Returns ``checkpoints.LoadedModel`` whose ``cfg`` computes in ``compute_dtype`` (default: the
  loaded parameters' dtype, i.e. the stored one unless ``dtype`` casts) with ``attention`` (default:
  the stored config's), and whose ``tokenizer_path`` is ``tokenizer`` or the checkpoint's own.
  """
  import dataclasses

  from astrollama_jax import checkpoints

  loaded = checkpoints.load_model(checkpoint, mesh=mesh, dtype=dtype)
  cfg = loaded.cfg.replace(compute_dtype=compute_dtype or loaded.cfg.param_dtype)
  if attention:
    cfg = cfg.replace(attention_impl=attention)
  tok = tokenizer or loaded.tokenizer_path
  if not tok:
    raise UserError(f"{checkpoint} has no tokenizer.model; pass --tokenizer=PATH")
  if not os.path.isfile(tok):
    raise UserError(f"--tokenizer {tok} does not exist")
  logging.info(
    "loaded %s (%s): %.1fM params, %s params, %s compute, %s attention",
    checkpoint,
    loaded.kind,
    cfg.num_params() / 1e6,
    cfg.param_dtype,
    cfg.compute_dtype,
    cfg.attention_impl,
  )
  return dataclasses.replace(loaded, cfg=cfg, tokenizer_path=tok)


def check_text(text: str, where: str) -> str:
  """``text``, or a ``UserError`` naming ``where`` if it cannot be encoded (a lone surrogate)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UserError(
      f"{where}: text that cannot be encoded as UTF-8 ({e.reason} at character {e.start})"
    ) from None
  return text


def check_output_file(path: str) -> None:
  """Fail before any work if ``path`` cannot be written as a file."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise UserError(f"--output {path} is a folder; give a file path")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"--output {path}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UserError(f"--output {path} is not writable")


def check_output_dir(path: str, empty: bool = True, flag: str = "--output") -> None:
  """Fail before any work if ``path`` cannot be created or written as a folder (or, with
  ``empty``, already holds files); ``flag`` names it in the message."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path} is a file; give a folder")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK):
    raise UserError(f"{flag} {path} is not writable")
  if empty and os.path.isdir(path) and os.listdir(path):
    raise UserError(f"{flag} {path} is not empty")


# --- errors ----------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that report a user-fixable problem wherever they are raised (our own
  checks raise ``ValueError`` subclasses too, e.g. ``CheckpointError``: see ``is_user_error``)."""
  from astrollama_jax import diskspace

  return (
    UserError,
    diskspace.DiskFullError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
  )


def _raised_here(error: BaseException) -> bool:
  """Whether ``error`` was raised by this package's own code (a check we wrote), not a library."""
  tb = traceback.extract_tb(error.__traceback__)
  package = os.path.dirname(os.path.abspath(__file__))
  return bool(tb) and os.path.abspath(tb[-1].filename).startswith(package + os.sep)


def is_user_error(error: BaseException) -> bool:
  """A user-fixable problem: one of ``_user_errors``, or a ``ValueError`` that our own code raised
  to name a bad value (a ``ValueError`` from inside a library is a bug and keeps its traceback)."""
  if isinstance(error, _user_errors()):
    return True
  return isinstance(error, ValueError) and _raised_here(error)


def fail(error: BaseException | str) -> None:
  """Exit the command with one ``error: ...`` line (status 1)."""
  message = str(error).strip() or type(error).__name__
  if logging.get_log_file_name():  # logs kept in a file (--log_dir) get it too; stderr only once
    logging.error("%s", message)
  raise SystemExit(f"error: {message}")


def guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """``fn(*args, **kwargs)``, with a user-fixable error turned into ``fail``."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - sorted by is_user_error; bugs are re-raised
    if is_user_error(e):
      fail(e)
    raise


def run(main: Callable[[list[str]], Any], **kwargs: Any) -> None:
  """``absl.app.run(main)``, with user-fixable errors reported as one line (see ``guard``)."""
  app.run(lambda argv: guard(main, argv), **kwargs)


def no_extra_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


# --- the closing summary ---------------------------------------------------------------------


def _cell(key: str, value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return "" if value is None else str(value)
  if isinstance(value, int) and "bytes" in key:
    return f"{value:,} ({value / 1024**3:.2f} GiB)"
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(jsonable(value), ensure_ascii=False)
  return str(value)


def _numeric(text: str) -> bool:
  """A cell that is a number (or a byte count with its GiB), right-aligned in tables."""
  head = text.split(" (", 1)[0] if text.endswith(" GiB)") else text
  try:
    float(head.replace(",", ""))
    return True
  except ValueError:
    return False


def format_table(
  rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, header: bool = True
) -> str:
  """A fixed-width text table of ``rows`` (dicts, or sequences in the order of ``columns``):
  numbers right-aligned to 4 decimals."""
  if not rows:
    return "(no rows)"
  columns = list(columns or rows[0].keys())
  rows = [r if isinstance(r, Mapping) else dict(zip(columns, r)) for r in rows]
  cells = [[_cell(c, r.get(c)) for c in columns] for r in rows]
  widths = [
    max(len(c) if header else 0, *(len(row[i]) for row in cells)) for i, c in enumerate(columns)
  ]
  head = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
  rule = "  ".join("-" * w for w in widths)
  body = [
    "  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths))
    for row in cells
  ]
  return "\n".join(([head, rule] if header else []) + body)


def jsonable(value: Any) -> Any:
  """numpy scalars and arrays, tuples and paths as plain JSON values (NaN and inf as null)."""
  import numpy as np

  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float):
    return None if math.isnan(value) or math.isinf(value) else value
  if isinstance(value, (str, int, bool)) or value is None:
    return value
  return str(value)


def report(
  title: str,
  summary: Mapping[str, Any],
  rows: Sequence[Mapping[str, Any]] | None = None,
  columns: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Close a command: ``title``, a table (``rows``, else the summary's keys and values), then
  ``summary`` as one JSON line, the last line of stdout, which scripts parse. Returns it."""
  summary = jsonable(dict(summary))
  if rows is None:
    pairs = [{"key": k, "value": _cell(k, v)} for k, v in summary.items()]
    print(f"{title}\n{format_table(pairs, header=False)}")
  else:
    print(f"{title}\n{format_table(rows, columns)}")
  print(json.dumps(summary, ensure_ascii=False), flush=True)
  return summary


def _command(module: str) -> Callable[[], None]:
  def run_module() -> None:
    runpy.run_module(module, run_name="__main__", alter_sys=True)

  run_module.__doc__ = f"python -m {module}"
  return run_module


globals().update({name: _command(module) for name, module in COMMANDS.items()})
