"""Test environment: CPU with 8 fake devices, offline HF, a persistent JAX compilation cache.

The variables are set before JAX is imported anywhere, so every test module sees them.
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

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real data; ASTROLLAMA_SHARED_DATA names another place than beside the checkout.
SHARED_DATA = pathlib.Path(os.environ.get("ASTROLLAMA_SHARED_DATA") or REPO.parent / "shared/data")
_CACHE = os.environ.get("ASTROLLAMA_JAX_CACHE", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
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
