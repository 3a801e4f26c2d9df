"""--compare: the same metrics of several runs in one markdown table and one PNG chart."""

import contextlib
import io

from absl import app
from helpers_models import run_cli
import matplotlib.image
import pytest

from astrollama_jax.eval import common


def _result(out_dir, task, label, metrics):
  with contextlib.redirect_stdout(io.StringIO()):  # finish() prints the table and JSON line
    common.finish(task, str(out_dir), label, f"/ckpt/{label}", metrics, rows=[{"x": 1}])


@pytest.fixture
def runs(tmp_path):
  """base and cpt: a directory each with perplexity + mcq results; sft: one mcq file only."""
  for label, ppl, acc in (("base", 12.5, 0.25), ("cpt", 9.75, 0.375)):
    _result(
      tmp_path / label,
      "perplexity",
      label,
      {"ppl": ppl, "ppl_lo": ppl - 0.5, "ppl_hi": ppl + 0.5, "nll": 2.5},
    )
    _result(
      tmp_path / label,
      "mcq",
      label,
      {"acc/letter": acc, "acc/letter/lo": acc - 0.125, "acc/letter/hi": acc + 0.125},
    )
  _result(
    tmp_path / "sft",
    "mcq",
    "sft",
    {"acc/letter": 0.5, "acc/letter/lo": 0.375, "acc/letter/hi": 0.625},
  )
  return tmp_path


def test_compare_writes_table_and_chart(runs, capsys):
  out = runs / "cmp" / "base_cpt_sft"
  summary = run_cli(
    capsys,
    f"--compare={runs / 'base'},{runs / 'cpt'},{runs / 'sft' / 'mcq.json'}",
    f"--compare_out={out}",
  )
  assert summary["runs"] == ["base", "cpt", "sft"]
  md = (runs / "cmp" / "base_cpt_sft.md").read_text().splitlines()
  assert md[0] == "| metric | base | cpt | sft |"
  rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in md[2:]}
  assert set(rows) == {"ppl", "nll", "acc/letter"}  # interval bounds are not rows
  assert rows["ppl"] == ["12.5 [12, 13]", "9.75 [9.25, 10.25]", "–"]
  assert rows["acc/letter"] == ["0.25 [0.125, 0.375]", "0.375 [0.25, 0.5]", "0.5 [0.375, 0.625]"]
  png = matplotlib.image.imread(str(runs / "cmp" / "base_cpt_sft.png"))
  assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 300
  assert png[..., :3].std() > 0.05  # something was drawn
  assert summary["metrics"]["cpt"]["ppl"] == 9.75


def test_compare_names_bad_inputs(runs, tmp_path, capsys):
  bad = tmp_path / "notes.json"
  bad.write_text('{"hello": 1}')
  with pytest.raises(common.EvalDataError, match="notes.json: not an eval result"):
    run_cli(capsys, f"--compare={runs / 'base'},{bad}", f"--compare_out={tmp_path / 'c'}")
  with pytest.raises(common.EvalDataError, match="no such result file"):
    run_cli(capsys, f"--compare={tmp_path / 'missing'}", f"--compare_out={tmp_path / 'c'}")


def test_eval_writes_only_where_it_is_told(runs, tmp_path, capsys, monkeypatch):
  """No --output default: a run never leaves results in the folder it was started from."""
  monkeypatch.chdir(tmp_path / "sft")
  before = sorted(p.name for p in (tmp_path / "sft").iterdir())
  with pytest.raises(app.UsageError, match="--compare_out=PREFIX or --output=DIR"):
    run_cli(capsys, f"--compare={runs / 'base'},{runs / 'cpt'}")
  with pytest.raises(app.UsageError, match="--task=perplexity needs --output=DIR"):
    run_cli(capsys, "--task=perplexity", "--checkpoint=none", "--data=none.jsonl")
  assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == before
  run_cli(capsys, f"--compare={runs / 'base'},{runs / 'cpt'}", f"--output={tmp_path / 'o'}")
  assert (tmp_path / "o" / "comparison.md").is_file()
