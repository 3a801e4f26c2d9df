"""The command-line surface every command shares: its common flags and how it ends.

Every entry point is an absl app started with ``cli.run(main)``:

* the flags several commands take (``--checkpoint``, ``--tokenizer``, ``--mesh``, ``--dtype``,
  ``--compute_dtype``, ``--attention``, ``--chat_template``, ``--output``) are defined here, by
  ``define``, with one meaning and one default each;
* a problem the user can fix (a missing file, a bad flag value, an output that is not empty)
  ends the command with one ``error: ...`` line on stderr and exit status 1, no traceback;
  tracebacks are for bugs (``run``);
* every command closes with ``util.tables.report``: a table for people, then the same summary
  as one JSON line for scripts.

The list of commands and how they are started is ``commands/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import os
import re
import traceback
from typing import TYPE_CHECKING, Any

from absl import app, flags, logging

from astrollama_jax import sharding
from astrollama_jax.errors import UserError

if TYPE_CHECKING:  # the loader's imports are heavy: commands import it when they run
  from astrollama_jax.checkpoints.loader import LoadedModel
  from astrollama_jax.data.chat_templates import ChatTemplate

DTYPES = ("float32", "bfloat16", "float16")
# The flags every command that loads a model for inference takes: ``cli.define(*MODEL_FLAGS)``.
MODEL_FLAGS = ("checkpoint", "tokenizer", "mesh", "dtype", "compute_dtype", "attention")


def _attention_impls() -> tuple[str, ...]:
  from astrollama_jax.model.config import ATTENTION_IMPLS

  return ATTENTION_IMPLS


def _chat_template_names() -> list[str]:
  from astrollama_jax.data.chat_templates import TEMPLATES

  return sorted(TEMPLATES)


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
      sharding.DEFAULT_MESH,
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
    "chat_template": (
      flags.DEFINE_enum,
      None,
      "Chat format (default: the one the checkpoint records, else llama2).",
      {"enum_values": _chat_template_names()},
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


# --- errors ----------------------------------------------------------------------------------


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that report a user-fixable problem wherever they are raised (our own
  checks raise ``ValueError`` subclasses too, e.g. ``CheckpointError``: see ``is_user_error``)."""
  from astrollama_jax.util import diskspace

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
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  kwargs.setdefault("flags_parser", parse_flags)
  app.run(lambda argv: guard(main, argv), **kwargs)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an override of a key the config does not have
  (``--config.no_such.key=1``) fails in one line naming the flag, as a misspelt flag does.

  ml_collections raises ``KeyError``/``AttributeError`` for it while the flags are parsed,
  before any ``main`` could catch it.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    frames = traceback.extract_tb(e.__traceback__)
    if not any("config_flags" in f.filename for f in frames):
      raise
    text: Any = e
    while isinstance(text, BaseException) and text.args:  # ml_collections nests its KeyError
      text = text.args[0]
    text = str(text)
    key = re.search(r"'([^']+)'", text)
    key = key.group(1) if key else text.strip("'\"")
    hint = re.search(r'Did you mean "([^"]+)"', text)
    flag = next(
      (a for a in argv[1:] if a.startswith("-") and f".{key}" in a.split("=", 1)[0]), None
    )
    fail(
      f"{flag + ': ' if flag else ''}the config has no key {key!r}"
      + (f"; did you mean {hint.group(1)!r}?" if hint else "")
    )
    raise  # not reached: fail exits


def no_extra_args(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


# --- generate and chat ---


def define_sampling_flags(
  temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256
) -> None:
  """The model and sampling flags ``generate`` and ``chat`` share."""
  define(
    *MODEL_FLAGS,
    "chat_template",
    required=["checkpoint"],
  )
  flags.DEFINE_integer("max_new_tokens", max_new_tokens, "Most tokens to generate per answer.")
  flags.DEFINE_float("temperature", temperature, "0 = greedy; else the sampling temperature.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", top_p, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); excluded from the output.")
  flags.DEFINE_string("system", None, "System prompt (chat format).")


def load_from_flags(F: flags.FlagValues = flags.FLAGS) -> LoadedModel:
  """``loader.load_model`` of the model the shared flags name, on their mesh, with its tokenizer
  required (``generate``, ``chat``, ``serve``)."""
  from astrollama_jax.checkpoints import loader

  return loader.load_model(
    F.checkpoint,
    sharding.mesh_from_text(F.mesh),
    dtype=F.dtype,
    compute_dtype=F.compute_dtype,
    attention=F.attention,
    tokenizer=F.tokenizer,
    need_tokenizer=True,
  )


def chat_template_from_flags(F: flags.FlagValues = flags.FLAGS) -> ChatTemplate:
  """The ``ChatTemplate`` of ``--chat_template``, else the one ``--checkpoint`` records, else
  its tokenizer's (``--tokenizer`` or the checkpoint's own) family's."""
  from astrollama_jax.checkpoints import loader
  from astrollama_jax.data import chat_templates

  return chat_templates.choose(
    F.chat_template,
    recorded=loader.recorded_chat_template(F.checkpoint),
    tokenizer=loader.tokenizer_path(F.checkpoint, F.tokenizer),
  )
