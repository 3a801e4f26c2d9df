"""Console scripts run their module as ``python -m`` would."""

import importlib.util
import subprocess
import sys

import pytest

from astrollama_jax import commands, sharding
from astrollama_jax.checkpoints import loader
from astrollama_jax.commands import cli, console
from astrollama_jax.errors import UserError
from astrollama_jax.util import checks, tables


def test_every_console_script_names_a_real_module():
  setup_py = cli.__file__.replace("astrollama_jax/commands/cli.py", "setup.py")
  spec = importlib.util.spec_from_file_location("setup_commands", setup_py)
  source = open(setup_py).read().split("\nsetup(\n")[0]  # the helpers, not the setup() call
  namespace: dict = {"__file__": setup_py}
  exec(compile(source, setup_py, "exec"), namespace)
  assert spec is not None and namespace["_commands"]() == commands.COMMANDS
  for name in commands.COMMANDS:
    module = importlib.import_module(f"astrollama_jax.commands.{name}")
    assert callable(module.define_flags) and callable(module.main), name
    assert callable(getattr(console, name))


@pytest.mark.parametrize("name,expect", [("convert", "source_format"), ("prepare", "--source")])
def test_console_script_shows_the_module_flags(name, expect):
  code = (
    f"import sys; sys.argv = ['astrollama-{name}', '--help']; "
    f"from astrollama_jax.commands import console; console.{name}()"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode in (0, 1), out.stderr[-2000:]  # absl exits 1 after --help
  assert expect in out.stdout


def test_format_table_aligns_columns():
  out = tables.format_table([{"a": "x", "b": 1.5}, {"a": "longer", "b": 22.25}])
  lines = out.splitlines()
  assert len({len(line) for line in lines}) == 1 and "22.2500" in out


def test_report_prints_a_table_then_one_json_line(capsys):
  import numpy as np

  summary = tables.report(
    "done",
    {
      "steps": np.int64(3),
      "loss": np.float32(0.5),
      "bad": float("nan"),
      "bytes": 2**30,
      "mesh": (1, 8, 1),
    },
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "done"
  assert any(line.startswith("bytes") and "1.00 GiB" in line for line in lines)
  import json

  assert (
    json.loads(lines[-1])
    == summary
    == {"steps": 3, "loss": 0.5, "bad": None, "bytes": 2**30, "mesh": [1, 8, 1]}
  )


@pytest.mark.parametrize("text", ["1,-1,1", "2,2,2", "-1,1,1"])
def test_mesh_shape_accepts_three_sizes(text):
  assert sharding.mesh_shape(text) == tuple(int(x) for x in text.split(","))


@pytest.mark.parametrize("text", ["", "1,1", "1,x,1", "1,0,1", "-1,-1,1", "1,-2,1", "1,1,1,1"])
def test_mesh_shape_names_a_bad_value(text):
  with pytest.raises(UserError, match="--mesh must be data,fsdp,tensor"):
    sharding.mesh_shape(text)


def test_shared_flags_have_one_default_everywhere():
  from absl import flags

  a, b = flags.FlagValues(), flags.FlagValues()
  cli.define("mesh", "dtype", "compute_dtype", "attention", "checkpoint", flag_values=a)
  cli.define("mesh", "compute_dtype", "output", flag_values=b, defaults={"output": "out"})
  a(["x"]), b(["x"])
  assert a.mesh == b.mesh == sharding.DEFAULT_MESH and a.compute_dtype is b.compute_dtype is None
  assert b.output == "out"
  with pytest.raises(ValueError, match="one default"):
    cli.define("mesh", flag_values=flags.FlagValues(), defaults={"mesh": "1,1,1"})
  with pytest.raises(flags.IllegalFlagValueError):
    a(["x", "--dtype=int4"])


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path):
  script = tmp_path / "command_under_test.py"
  script.write_text(
    "import sys\n"
    "from astrollama_jax import sharding\n"
    "from astrollama_jax.commands import cli\n"
    "def main(argv):\n"
    "  kind = sys.argv[-1]\n"
    "  if kind == 'user': sharding.mesh_shape('1,x,1')\n"
    "  if kind == 'missing': open('/nonexistent/file')\n"
    "  if kind == 'bug': import json; json.loads('{')\n"
    "if __name__ == '__main__':\n"
    "  sys.argv, kind = sys.argv[:1], sys.argv[1]\n"
    "  sys.argv.append(kind)\n"
    "  cli.run(main)\n"
  )

  def run(kind):
    return subprocess.run(
      [sys.executable, str(script), kind], capture_output=True, text=True, timeout=120
    )

  for kind, needle in (("user", "error: --mesh must be"), ("missing", "error: [Errno 2]")):
    proc = run(kind)
    assert proc.returncode == 1 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
  bug = run("bug")  # a ValueError from a library (json) is a bug: its traceback is shown
  assert bug.returncode == 1 and "Traceback" in bug.stderr and "JSONDecodeError" in bug.stderr


def test_load_model_computes_in_the_stored_dtype(tmp_path):
  """A float32 HF folder computes in float32 unless told otherwise; --dtype casts both."""
  from hf_reference import save_hf_model

  from astrollama_jax.model.config import get_config

  cfg = get_config("tiny")
  save_hf_model(cfg, tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.model").write_bytes(b"")  # only its presence is checked here
  m = loader.load_model(str(tmp_path / "hf"))
  assert (m.cfg.param_dtype, m.cfg.compute_dtype) == ("float32", "float32")
  m = loader.load_model(str(tmp_path / "hf"), dtype="bfloat16")
  assert (m.cfg.param_dtype, m.cfg.compute_dtype) == ("bfloat16", "bfloat16")
  m = loader.load_model(str(tmp_path / "hf"), compute_dtype="bfloat16", attention="jax")
  assert (m.cfg.compute_dtype, m.cfg.attention_impl) == ("bfloat16", "jax")


def test_output_checks_name_the_problem(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(UserError, match="is a folder"):
    checks.check_output_file(str(tmp_path))
  with pytest.raises(UserError, match="is a file, not a folder"):
    checks.check_output_file(str(f / "out.jsonl"))
  with pytest.raises(UserError, match="is a file; give a folder"):
    checks.check_output_dir(str(f))
  with pytest.raises(UserError, match="is not empty"):
    checks.check_output_dir(str(tmp_path))
  checks.check_output_dir(str(tmp_path), empty=False)
  checks.check_output_dir(str(tmp_path / "new" / "deeper"))
  with pytest.raises(UserError, match="cannot be encoded"):
    checks.check_text("a\ud800b", "line 3")
