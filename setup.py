"""astrollama-jax: LLaMA-2 continual pre-training and chat SFT on astro-ph, in pure JAX."""

import ast
import pathlib

from setuptools import find_packages, setup


def _commands() -> tuple[str, ...]:
  """The one list of commands (``astrollama_jax/commands/__init__.py``), read without importing."""
  tree = ast.parse(
    pathlib.Path(__file__)
    .with_name("astrollama_jax")
    .joinpath("commands", "__init__.py")
    .read_text()
  )
  for node in tree.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMMANDS":
      return tuple(ast.literal_eval(node.value))
  raise RuntimeError("astrollama_jax/commands/__init__.py has no COMMANDS")


setup(
  name="astrollama-jax",
  version="0.1.0",
  description="AstroLLaMA-Chat recipe in JAX: arXiv LaTeX -> CPT -> chat SFT -> HF hub",
  # The top-level configs/ and data/ folders ship inside the package (astrollama_jax.util.resources
  # finds them there after a non-editable install, and at the top level in a checkout).
  packages=find_packages(include=["astrollama_jax", "astrollama_jax.*"])
  + ["astrollama_jax.configs", "astrollama_jax.demo_data"],
  package_dir={"astrollama_jax.configs": "configs", "astrollama_jax.demo_data": "data"},
  package_data={
    "astrollama_jax.configs": ["*.py", "**/*.py"],
    "astrollama_jax.demo_data": ["**/*"],
    "astrollama_jax.eval": ["*.md", "tasks/*.yaml"],
    "astrollama_jax.serve": ["static/*"],
  },
  include_package_data=False,
  python_requires=">=3.10",
  # Pinned to the versions this project is tested with; newer minors are allowed where they work.
  install_requires=[
    "jax>=0.10.2,<0.13",
    "jaxlib>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<4.10",
    "sentencepiece>=0.2.3,<0.3",
    "absl-py>=2.5.1,<3",
    "ml_collections>=1.1.0,<2",
    "numpy>=2.0",
    "safetensors>=0.8.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6.5",
    "matplotlib>=3.9",
    "psutil>=5.9",
    "tokenizers>=0.20,<1",
    "tiktoken>=0.7,<1",
  ],
  entry_points={
    "console_scripts": [
      f"astrollama-{name.replace('_', '-')}=astrollama_jax.commands.console:{name}"
      for name in _commands()
    ],
  },
  extras_require={
    # Weights & Biases logging of training runs (--config.log.wandb=True)
    "wandb": ["wandb>=0.19"],
    # torch is named exactly: a CPU wheel here; an unpinned torch pulls GBs of CUDA packages.
    "test": [
      "pytest>=9.0",
      "pytest-xdist>=3.8",
      "filelock>=3.12",  # tests/conftest.py: one demo corpus shared by the xdist workers
      "pytest-timeout>=2.4",
      "hypothesis>=6.150",
      # lint and format (checked by .ci/run); pinned so the formatter's output cannot drift
      "ruff==0.17.6",
      "torch==2.13.0",
      "transformers>=5.20,<6",
      # lm-evaluation-harness: `astrollama-harness`, and its hf backend for the parity test
      "lm-eval==0.4.13",
      "accelerate>=1.15.0",
      # The TPU compiler (jax 0.10.2's own "tpu" extra pin): tests/test_tpu_plan.py compiles
      # for a TPU slice on a CPU host with it; no TPU needed, and without it that test skips.
      "libtpu==0.0.42.*",
      # The server's tests: the official client, and selenium driving Debian's Chromium.
      "openai>=3.57,<4",
      "selenium>=4.51,<5",
      "peft==0.21.2",  # LoRA adapter export is checked against peft's loader
    ],
  },
)
