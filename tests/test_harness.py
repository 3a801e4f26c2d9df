"""lm-evaluation-harness on our model: the same numbers as lm-eval's own ``hf`` backend.

One random tiny LLaMA-2, and one LLaMA 3.1 (its 128,256-entry vocabulary and tokenizer.json), are
saved as HF folders; lm-eval runs each once through ``hf`` (PyTorch)
and once through our ``astrollama`` model (JAX, float32, on a 2x2x2 mesh), offline, over local
JSONL: the shipped astronomy tasks (multiple choice two ways, rolling perplexity), a
loglikelihood task whose ``acc`` is lm-eval's is_greedy, and a generation task with stop
sequences. Every document's answer and every metric must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from absl import flags  # noqa: E402
from helpers import REPO, write_jsonl  # noqa: E402
from helpers_harness import STOP, mcq_records, write_setup  # noqa: E402
from hf_reference import TINY  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from astrollama_jax.commands import harness as harness_cli  # noqa: E402
from astrollama_jax.errors import UserError
from astrollama_jax.eval import compare, lm_eval_run  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

MAX_LENGTH = 64  # short, so rolling windows, left truncation and the generation budget all bite
LIMIT = 4
SHIPPED = ["astro_mcq", "astro_mcq_cloze", "astro_ph_abstracts"]
OURS_ONLY = ["astro_greedy", "astro_complete"]  # written by the test


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, abstracts):
  """The LLaMA-2 model's folder (``helpers_harness.write_setup``)."""
  return write_setup(tmp_path_factory.mktemp("harness"), TINY, tokenizer_path, abstracts)


@pytest.fixture(scope="module")
def setup_llama3(tmp_path_factory, shared_data, abstracts):
  """The LLaMA 3.1 model's folder, with the real LLaMA 3 tokenizer.json."""
  from astrollama_jax.model.config import get_config

  tok = shared_data / "tokenizer" / "llama3" / "tokenizer.json"
  if not tok.exists():
    pytest.skip("LLaMA 3 tokenizer not in shared data")
  cfg = get_config("llama3_1_8b").replace(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, compute_dtype="float32"
  )
  return write_setup(tmp_path_factory.mktemp("harness_llama3"), cfg, tok, abstracts)


def _evaluate(model, model_args, root, tasks, **kw):
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  # lm-eval's own tasks are not needed here (indexing them takes most of a minute)
  manager = TaskManager(
    include_path=[lm_eval_run.TASKS_DIR, str(root / "tasks")], include_defaults=False
  )
  return simple_evaluate(
    model=model,
    model_args=model_args,
    tasks=tasks,
    limit=LIMIT,
    task_manager=manager,
    log_samples=True,
    bootstrap_iters=0,
    **kw,
  )


@pytest.fixture(scope="module")
def both(setup):
  return _both(setup)


@pytest.fixture(scope="module")
def both_llama3(setup_llama3):
  return _both(setup_llama3)


@pytest.fixture(params=["llama2", "llama3"])
def results(request):
  """(hf, ours) for each model family."""
  return request.getfixturevalue("both" if request.param == "llama2" else "both_llama3")


def _both(setup):
  """lm-eval's results through hf and through astrollama, run from the data's folder."""
  from astrollama_jax.eval.lm_eval_model import AstroLlamaLM

  torch.set_num_threads(1)
  cwd = os.getcwd()
  os.chdir(setup)
  try:
    hf = _evaluate(
      "hf",
      f"pretrained={setup / 'hf'},dtype=float32,max_length={MAX_LENGTH}",
      setup,
      SHIPPED + OURS_ONLY,
      device="cpu",
      batch_size=2,
    )
    lm = AstroLlamaLM(
      checkpoint=str(setup / "hf"),
      mesh="2,2,2",
      compute_dtype="float32",
      max_length=MAX_LENGTH,
      batch_size=4,
      progress=False,
    )
    ours = _evaluate(lm, None, setup, SHIPPED + OURS_ONLY)
  finally:
    os.chdir(cwd)
  return hf, ours


def _numbers(resps):
  """A sample's filtered responses as a flat list of floats (bools as 0/1) or of strings."""
  flat = []
  for r in resps:
    flat += list(r) if isinstance(r, (list, tuple)) else [r]
  return flat


@pytest.mark.parametrize("task", SHIPPED + OURS_ONLY)
def test_every_document_scores_like_the_hf_backend(results, task):
  hf, ours = results
  a, b = hf["samples"][task], ours["samples"][task]
  assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and len(a) == LIMIT
  for x, y in zip(a, b):
    assert x["arguments"] == y["arguments"]  # the same prompts, few-shot and choices
    fx, fy = _numbers(x["filtered_resps"]), _numbers(y["filtered_resps"])
    if task == "astro_complete":
      assert fx == fy, (x["arguments"], fx, fy)
    else:
      np.testing.assert_allclose(
        np.asarray(fy, float),
        np.asarray(fx, float),
        rtol=1e-5,
        atol=1e-4,
        err_msg=f"{task} doc {x['doc_id']}",
      )


@pytest.mark.parametrize("task", SHIPPED + OURS_ONLY)
def test_every_metric_equals_the_hf_backend(results, task):
  hf, ours = results
  a, b = hf["results"][task], ours["results"][task]
  assert set(a) == set(b)
  numeric = {k: v for k, v in a.items() if isinstance(v, float) and k != "alias"}
  assert numeric, a
  for key, value in numeric.items():
    assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, key, value, b[key])


def test_the_tasks_exercise_what_they_should(both):
  """Not vacuous: is_greedy true and false, stop strings cut, rolling over several windows."""
  _, ours = both
  greedy = [bool(s["filtered_resps"][0][1]) for s in ours["samples"]["astro_greedy"]]
  assert any(greedy) and not all(greedy)
  texts = [s["filtered_resps"][0] for s in ours["samples"]["astro_complete"]]
  assert any(texts) and not any(c in t for t in texts for c in STOP)
  lengths = [
    len(s["doc"].get("text") or s["doc"].get("abstract"))
    for s in ours["samples"]["astro_ph_abstracts"]
  ]
  assert min(lengths) > 4 * MAX_LENGTH  # characters: every text spans more than one window
  assert ours["results"]["astro_ph_abstracts"]["word_perplexity,none"] > 1


def _run_cli(capsys, *args):
  fv = flags.FlagValues()
  harness_cli.define_flags(fv)
  argv = fv(["harness", "--noprogress", *args])
  harness_cli.main(argv, fv)
  return capsys.readouterr().out.strip().splitlines()


def test_cli_prints_the_table_and_results_and_writes_files(
  setup, both, capsys, monkeypatch, tokenizer_path
):
  monkeypatch.chdir(setup)
  out = setup / "cli_out"
  lines = _run_cli(
    capsys,
    f"--checkpoint={setup / 'hf'}",
    f"--tokenizer={tokenizer_path}",
    "--tasks=astro_mcq,astro_ph_abstracts,astro_complete",
    f"--include_path={setup / 'tasks'}",
    f"--limit={LIMIT}",
    f"--max_length={MAX_LENGTH}",
    "--compute_dtype=float32",
    "--mesh=2,2,2",
    "--batch_size=4",
    "--bootstrap_iters=0",
    f"--output={out}",
    "--label=tiny",
  )
  summary = json.loads(lines[-1])
  table = "\n".join(lines[:-1])
  assert "|astro_mcq" in table and "word_perplexity" in table and "Metric" in table
  _, ours = both
  for task in ("astro_mcq", "astro_ph_abstracts", "astro_complete"):
    for key, value in ours["results"][task].items():
      if isinstance(value, float):
        assert summary["results"][task][key] == pytest.approx(value, rel=1e-6), (task, key)
  # lm-eval's results file, and ours that --compare reads
  lm_file = summary["files"]["lm_eval"]
  assert os.path.isfile(lm_file) and os.path.dirname(lm_file) == str(out / "tiny")
  with open(lm_file) as f:
    assert json.load(f)["results"] == summary["results"]
  with open(out / "harness.json") as f:
    ours_file = json.load(f)
  assert ours_file["label"] == "tiny" and ours_file["task"] == "harness"
  assert ours_file["metrics"]["astro_mcq/acc"] == summary["results"]["astro_mcq"]["acc,none"]
  assert "astro_mcq/sample_len" not in ours_file["metrics"]
  ((label, metrics),) = compare.load_runs([str(out)])
  assert label == "tiny"
  assert metrics["astro_ph_abstracts/bits_per_byte"] == pytest.approx(
    summary["results"]["astro_ph_abstracts"]["bits_per_byte,none"]
  )


def test_shipped_yamls_load_with_lm_evals_task_manager(tmp_path, monkeypatch, abstracts):
  from lm_eval.tasks import TaskManager

  (tmp_path / "astro_eval").mkdir()
  write_jsonl(tmp_path / "astro_eval" / "astro_mcq.jsonl", mcq_records(abstracts, letters=False))
  write_jsonl(
    tmp_path / "astro_eval" / "astro_ph_abstracts.jsonl",
    [{"abstract": a, "text": None if i % 2 else a} for i, a in enumerate(abstracts[:5])],
  )
  monkeypatch.chdir(tmp_path)
  manager = TaskManager(include_path=lm_eval_run.TASKS_DIR, include_defaults=False)
  assert set(SHIPPED) <= set(manager.all_subtasks) and "astro" in manager.all_tags
  loaded = manager.load(["astro"])["tasks"]
  assert sorted(loaded) == SHIPPED
  mcq = loaded["astro_mcq"]
  doc = mcq.test_docs()[1]
  assert mcq.doc_to_target(doc) == 1 and mcq.doc_to_choice(doc) == ["A", "B", "C", "D"]
  assert mcq.doc_to_text(doc).endswith("\nD. " + doc["D"] + "\nAnswer:")
  assert mcq.doc_to_target(mcq.test_docs()[3]) == 3
  assert mcq.config.description.startswith("The following are multiple choice questions")
  cloze = loaded["astro_mcq_cloze"]
  assert cloze.doc_to_choice(doc) == [doc["A"], doc["B"], doc["C"], doc["D"]]
  ppl = loaded["astro_ph_abstracts"]
  assert [ppl.doc_to_target(d) for d in ppl.test_docs()] == abstracts[:5]


def test_unknown_task_is_one_error_line(setup, tokenizer_path):
  repo = str(REPO)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "harness",
      f"--checkpoint={setup / 'hf'}",
      "--tasks=astro_mcq,no_such_task_xyz",
      f"--output={setup / 'bad_out'}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert res.returncode == 1, res.stderr[-2000:]
  errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert errors == [errors[0]] and "no_such_task_xyz" in errors[0], res.stderr[-2000:]
  assert "astro_mcq" not in errors[0] and "Traceback" not in res.stderr
  assert not (setup / "bad_out").exists()


def test_two_processes_give_the_single_process_results(setup, both, tmp_path, tokenizer_path):
  """jax.distributed over loopback, 4 CPU devices each, one 2x2x2 mesh: process 0 prints and
  writes the numbers one process computes; process 1 prints and writes nothing."""
  from helpers import free_port
  from helpers_train import train_env

  _, ours = both
  tasks = ["astro_mcq", "astro_greedy", "astro_ph_abstracts", "astro_complete"]
  port, out = free_port(), tmp_path / "out"
  procs = []
  for i in range(2):
    cmd = [
      sys.executable,
      "-m",
      "astrollama_jax",
      "harness",
      f"--checkpoint={setup / 'hf'}",
      f"--tokenizer={tokenizer_path}",
      f"--tasks={','.join(tasks)}",
      f"--include_path={setup / 'tasks'}",
      f"--limit={LIMIT}",
      f"--max_length={MAX_LENGTH}",
      "--compute_dtype=float32",
      "--mesh=2,2,2",
      "--batch_size=4",
      "--bootstrap_iters=0",
      f"--output={out}",
      "--label=tiny",
      "--noprogress",
      "--num_processes=2",
      f"--coordinator_address=127.0.0.1:{port}",
      f"--process_id={i}",
    ]
    procs.append(
      subprocess.Popen(
        cmd, cwd=setup, env=train_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  summary = json.loads(outputs[0][0].strip().splitlines()[-1])
  # (gloo, the CPU collectives library, prints its connections on stdout itself)
  assert [line for line in outputs[1][0].splitlines() if "peer ranks" not in line] == []
  for task in tasks:
    want = {k: v for k, v in ours["results"][task].items() if isinstance(v, float)}
    got = {k: summary["results"][task][k] for k in want}
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5), task
  assert sorted(os.listdir(out)) == ["datasets_cache", "harness.json", "tiny"]
  assert len(os.listdir(out / "tiny")) == 1  # one results file, from process 0


def test_model_args_string_builds_the_registered_model(setup):
  """``simple_evaluate(model="astrollama", model_args="checkpoint=...")`` goes this way."""
  from lm_eval.api.registry import get_model

  import astrollama_jax.eval.lm_eval_model  # noqa: F401  (registers the model)

  lm = get_model("astrollama").create_from_arg_string(
    f"checkpoint={setup / 'hf'},compute_dtype=float32,max_length=32",
    {"batch_size": "auto", "device": "cpu", "max_batch_size": None},
  )
  assert (lm.max_length, lm.batch_size, lm.cfg.compute_dtype) == (32, 8, "float32")
  context, continuation = lm._encode_pair("The Sun is a ", "star")
  assert context[0] == lm.prefix_token_id == 1 and lm.tok_decode(continuation) == "star"
  with pytest.raises(ValueError, match="max_length"):
    get_model("astrollama").create_from_arg_string(f"pretrained={setup / 'hf'},max_length=4096")


def test_bad_include_path_and_limit_are_user_errors(tmp_path):

  with pytest.raises(UserError, match="not a folder"):
    lm_eval_run.task_manager([str(tmp_path / "nope")])
  with pytest.raises(UserError, match="--limit"):
    harness_cli._limit(0)
  assert harness_cli._limit(3.0) == 3 and harness_cli._limit(0.5) == 0.5


def _harness(*args):
  """The command in this process, as ``cli.run`` ends it: None, or its one ``error:`` line."""
  from astrollama_jax.commands import cli

  fv = flags.FlagValues()
  harness_cli.define_flags(fv)
  try:
    cli.guard(harness_cli.main, fv(["harness", "--noprogress", *args]), fv)
  except SystemExit as e:
    assert str(e.code).startswith("error: ") and "\n" not in str(e.code), e.code
    return str(e.code)
  return None


def test_empty_or_broken_task_data_is_one_line_before_the_model_loads(setup, tmp_path, monkeypatch):
  good = {"question": "Which?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A"}
  for name, text, word in [
    ("empty", "", "no records"),
    ("broken", json.dumps(good) + "\n{not json\n", "JSON"),
    ("fields", json.dumps({"text": "no question"}) + "\n", "question"),
  ]:
    folder = tmp_path / name
    (folder / "astro_eval").mkdir(parents=True)
    (folder / "astro_eval" / "astro_mcq.jsonl").write_text(text)
    monkeypatch.chdir(folder)
    error = _harness(
      f"--checkpoint={setup / 'hf'}", "--tasks=astro_mcq", f"--output={folder / 'out'}"
    )
    assert error and "astro_mcq" in error and "astro_eval/astro_mcq.jsonl" in error, error
    assert word in error, error
    assert not (folder / "out" / lm_eval_run.RESULT_FILE).exists()


def test_the_datasets_cache_stays_under_the_output(setup, tmp_path, monkeypatch, tokenizer_path):
  """Nothing under HOME: datasets' default cache is ~/.cache/huggingface/datasets."""
  from datasets import config

  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
  default = home / ".cache" / "huggingface" / "datasets"  # what datasets makes of this HOME
  monkeypatch.setattr(config, "HF_DATASETS_CACHE", default)
  monkeypatch.setattr(config, "DOWNLOADED_DATASETS_PATH", default / "downloads")
  monkeypatch.setattr(config, "EXTRACTED_DATASETS_PATH", default / "downloads" / "extracted")
  monkeypatch.chdir(setup)
  out = tmp_path / "out"
  assert (
    _harness(
      f"--checkpoint={setup / 'hf'}",
      f"--tokenizer={tokenizer_path}",
      "--tasks=astro_mcq",
      "--limit=2",
      f"--max_length={MAX_LENGTH}",
      "--compute_dtype=float32",
      "--mesh=2,2,2",
      "--bootstrap_iters=0",
      f"--output={out}",
    )
    is None
  )
  assert list(home.iterdir()) == []
  assert (out / lm_eval_run.RESULT_FILE).is_file() and any((out / "datasets_cache").iterdir())
  assert config.HF_DATASETS_CACHE == default  # as it was, for whatever runs next
