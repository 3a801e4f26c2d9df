"""The console scripts ``astrollama-COMMAND``: one function per command, named after it."""

from __future__ import annotations

from collections.abc import Callable
import sys

from astrollama_jax.commands import COMMANDS, start


def _console_script(name: str) -> Callable[[], None]:
  def run() -> None:
    start(name, [f"astrollama-{name.replace('_', '-')}", *sys.argv[1:]])

  run.__doc__ = f"python -m astrollama_jax {name}"
  return run


globals().update({name: _console_script(name) for name in COMMANDS})
