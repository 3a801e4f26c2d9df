"""``python -m astrollama_jax COMMAND [--flags]``: run one of ``commands.COMMANDS``."""

import sys

from astrollama_jax.commands import COMMANDS, start

if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
  print(f"usage: python -m astrollama_jax COMMAND [--flags]\ncommands: {', '.join(COMMANDS)}")
  sys.exit(0 if len(sys.argv) >= 2 else 2)
# The program name is the console script's: without a space, since some libraries name the
# process after it, and a process name with a space is one Slurm's process tracking cannot read
# in /proc/PID/stat (such a task never gets the scheduler's SIGTERM).
start(sys.argv[1], [f"astrollama-{sys.argv[1].replace('_', '-')}", *sys.argv[2:]])
