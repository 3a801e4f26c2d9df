"""``python -m astrollama_jax COMMAND [--flags]``: run one of ``commands.COMMANDS``."""

import sys

from astrollama_jax.commands import COMMANDS, start

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
  print(f"usage: python -m astrollama_jax COMMAND [--flags]\ncommands: {', '.join(COMMANDS)}")
  sys.exit(0 if len(sys.argv) >= 2 else 2)
start(sys.argv[1], [f"astrollama_jax {sys.argv[1]}", *sys.argv[2:]])
