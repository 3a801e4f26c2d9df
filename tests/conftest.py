"""Test environment: CPU with 8 fake devices, offline HF, one persistent JAX compilation cache.

The variables are set before JAX is imported anywhere, so every test module sees them, and
exported, so every command a test starts (``train``, ``serve``, ``bench``, ...) shares the cache.
Under ``pytest-xdist`` (``pytest.ini``) the slowest modules are handed out first.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real data; ASTROLLAMA_SHARED_DATA names another place than beside the checkout.
SHARED_DATA = pathlib.Path(os.environ.get("ASTROLLAMA_SHARED_DATA") or REPO.parent / "shared/data")
_CACHE = os.environ.get("ASTROLLAMA_JAX_CACHE", str(REPO / ".jax_cache"))
# A command started by a test compiles the same small programs (init, restore, steps) as the
# dozens started before it: the children keep every compiled program, however quick to build.
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
# This process compiles each program once: only those slow to build are worth a disk write.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:  # the machine's cores are shared: torch's thread pool only adds contention for tiny models
  import torch  # noqa: E402

  torch.set_num_threads(1)
except ImportError:
  pass


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (or set ASTROLLAMA_SHARED_DATA)")
  return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_path(shared_data) -> str:
  return str(shared_data / "tokenizer" / "llama2" / "tokenizer.model")


@pytest.fixture(scope="session")
def abstracts(shared_data) -> list[str]:
  """The first 64 real astro-ph abstracts."""
  import json

  out = []
  with open(shared_data / "arxiv-astro-ph" / "abstracts.jsonl") as f:
    for line in f:
      out.append(json.loads(line)["abstract"])
      if len(out) == 64:
        break
  return out


# Modules by cost, the dearest first (measured with ``--durations``): ``pytest.ini`` hands whole
# modules to the xdist workers in this order (``--dist loadfile --no-loadscope-reorder``), so a
# long module starts early instead of running alone at the end. The others keep their order.
SLOW_FIRST = (
  "test_elastic_resume.py",
  "test_package.py",
  "test_slurm.py",
  "test_goodput.py",
  "test_restore_errors.py",
  "test_train_cli.py",
  "test_lora.py",
  "test_watchdog.py",
  "test_tpu_plan.py",
  "test_bench.py",
  "test_model.py",
  "test_feedback.py",
  "test_train_step.py",
  "test_attention_kernels.py",
  "test_generate.py",
  "test_lora_export.py",
  "test_harness.py",
  "test_pipeline.py",
  "test_evaluation.py",
  "test_multihost.py",
  "test_workdir_lock.py",
  "test_serve_browser.py",
  "test_serve_hostile.py",
  "test_llama3_model.py",
  "test_resume_workers.py",
  "test_merge.py",
  "test_corpus_updates.py",
  "test_arxiv_bulk.py",
)


def pytest_collection_modifyitems(config, items) -> None:
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-module order kept


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> pathlib.Path:
  """The repository's demo corpus, ``prepare``d once per run for every module (and every xdist
  worker) that trains on it; tests only read it."""
  from filelock import FileLock
  from helpers import prepare_demo_corpus

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the run's folder, above each worker's own
  out = root / "demo_corpus"
  with FileLock(str(root / "demo_corpus.lock")):
    if not (root / "demo_corpus.done").exists():
      prepare_demo_corpus(out)
      (root / "demo_corpus.done").touch()
  return out
