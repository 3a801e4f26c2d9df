"""Console scripts run their module as ``python -m`` would."""

import importlib.util
import re
import subprocess
import sys

import pytest

from astrollama_jax import cli


def test_every_console_script_names_a_real_module():
  setup_py = open(cli.__file__.replace("astrollama_jax/cli.py", "setup.py")).read()
  names = re.search(r'for name in \((.*?)\)\s*\]', setup_py, re.S).group(1)
  assert set(re.findall(r'"(\w+)"', names)) == set(cli.COMMANDS)
  for name, module in cli.COMMANDS.items():
    assert importlib.util.find_spec(module) is not None, module
    assert callable(getattr(cli, name))


@pytest.mark.parametrize("name,expect", [("convert", "source_format"), ("prepare", "--source")])
def test_console_script_shows_the_module_flags(name, expect):
  code = f"import sys; sys.argv = ['astrollama-{name}', '--help']; from astrollama_jax import cli; cli.{name}()"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode in (0, 1), out.stderr[-2000:]  # absl exits 1 after --help
  assert expect in out.stdout
