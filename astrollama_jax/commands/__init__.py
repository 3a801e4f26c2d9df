"""The commands, one module each: its flags (``define_flags``) and its ``main``, thin.

Each runs as ``python -m astrollama_jax COMMAND --flag=...`` or as the console script
``astrollama-COMMAND`` (``commands/console.py``); both go through ``start``. The library below
never imports this package.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
import sys

# The one list of commands: setup.py's console scripts and ``python -m astrollama_jax`` read it.
COMMANDS = (
  "prepare",
  "convert",
  "train",
  "export",
  "merge",
  "generate",
  "chat",
  "eval",
  "harness",
  "serve",
  "feedback",
  "make_qa",
  "aot",
  "bench",
  "demo",
)


def start(name: str, argv: Sequence[str] | None = None) -> None:
  """Define ``name``'s flags and run its ``main`` with ``argv`` (default: ``sys.argv``)."""
  from astrollama_jax.commands import cli

  if name not in COMMANDS:
    raise SystemExit(f"error: no command {name!r}; commands: {', '.join(COMMANDS)}")
  from absl import flags

  if argv is not None:
    sys.argv = list(argv)
  module = importlib.import_module(f"astrollama_jax.commands.{name}")
  module.define_flags()
  sys.modules["__main__"].__doc__ = module.__doc__  # what --help prints above the flags
  # --help lists the flags of the program it names (sys.argv[0]): the command's and shared ones.
  for defined_in in (module, cli):
    for flag in flags.FLAGS.get_flags_for_module(defined_in.__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  cli.run(module.main)
