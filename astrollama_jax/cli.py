"""Console scripts (``astrollama-train`` ...): each runs its module exactly as ``python -m`` does.

The modules define their absl flags under ``if __name__ == "__main__"``, so a console script
runs the module as ``__main__`` rather than importing a function from it.
"""

from __future__ import annotations

import runpy
from typing import Callable

COMMANDS = {
    "prepare": "astrollama_jax.prepare",
    "train": "astrollama_jax.train",
    "convert": "astrollama_jax.convert",
    "export": "astrollama_jax.export",
    "generate": "astrollama_jax.generate",
    "chat": "astrollama_jax.chat",
    "eval": "astrollama_jax.eval",
    "bench": "astrollama_jax.bench",
    "aot": "astrollama_jax.aot",
    "make_qa": "astrollama_jax.make_qa",
    "demo": "astrollama_jax.demo",
}


def _command(module: str) -> Callable[[], None]:
  def run() -> None:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  run.__doc__ = f"python -m {module}"
  return run


globals().update({name: _command(module) for name, module in COMMANDS.items()})
