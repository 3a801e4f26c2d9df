"""What a LoRA workdir's checkpoints are adapters *of*: ``WORKDIR/lora.json``.

A LoRA run checkpoints only its adapters and their optimizer state, so a 70B LoRA workdir is
megabytes, not hundreds of gigabytes; the base model is named instead: the resolved base path
(a step folder rather than a workdir whose latest step may move on), its kind, and a
fingerprint of the files, checked whenever the base is re-read (a resumed run, export, eval),
so adapters are never silently applied to another model. A random base (``init_checkpoint=''``,
for tests and benchmarks) is recorded by its seed and rebuilt from it. This module reads and
writes the record and the adapters; ``loader`` merges them into the base when a LoRA workdir is
loaded.

The fingerprint reads file names, sizes and the first and last 64 KiB of each file: cheap
for 140 GB of weights, and it changes with any rewrite of a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from astrollama_jax.checkpoints.layout import CONFIG_FILE, CheckpointError
from astrollama_jax.checkpoints.locate import locate
from astrollama_jax.checkpoints.reader import restore_on_host
from astrollama_jax.model.lora import LoraSpec
from astrollama_jax.util import diskspace

LORA_FILE = "lora.json"
_EDGE = 64 * 1024


def _files(kind: str, root: str, params_dir: str | None) -> list[str]:
  if kind == "hf":
    return sorted(
      os.path.join(root, f)
      for f in os.listdir(root)
      if f.endswith(".safetensors") or f == "config.json"
    )
  out = [os.path.join(root, CONFIG_FILE)]
  for folder, _, names in os.walk(params_dir):
    out += [os.path.join(folder, n) for n in names]
  return sorted(out)


def fingerprint(path: str) -> str:
  """A short digest of the model at ``path`` (any kind ``locate`` knows)."""
  kind, root, params_dir, _ = locate(path)
  top = params_dir if kind != "hf" else root
  h = hashlib.sha256()
  for file in _files(kind, root, params_dir):
    size = os.path.getsize(file)
    rel = os.path.relpath(file, top if file.startswith(top) else root)
    h.update(f"{rel}\0{size}\0".encode())
    with open(file, "rb") as f:
      h.update(f.read(_EDGE))
      if size > 2 * _EDGE:
        f.seek(size - _EDGE)
        h.update(f.read(_EDGE))
  return h.hexdigest()[:32]


def base_record(init_checkpoint: str, seed: int) -> dict[str, Any]:
  """How to find the base again: a resolved path + fingerprint, or a random init's seed."""
  if not init_checkpoint:
    return {"kind": "random", "seed": int(seed)}
  kind, root, params_dir, step = locate(init_checkpoint)
  path = os.path.dirname(params_dir) if kind == "workdir" else root  # pin the step
  return {
    "kind": "step" if kind == "workdir" else kind,
    "path": os.path.abspath(path),
    "step": step,
    "fingerprint": fingerprint(path),
  }


def write(workdir: str, spec: LoraSpec, base_dtype: str, base: dict[str, Any]) -> None:
  """Write ``WORKDIR/lora.json``: the adapters' spec, the base's dtype and ``base_record``."""
  record = {"lora": spec.to_dict(), "base_dtype": base_dtype, "base": base}
  diskspace.write_atomic(os.path.join(workdir, LORA_FILE), json.dumps(record, indent=2) + "\n")


def read(root: str) -> dict[str, Any] | None:
  """The record of a LoRA workdir, or None for a full model."""
  file = os.path.join(root, LORA_FILE)
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      record = json.load(f)
    record["spec"] = LoraSpec.from_dict(record["lora"])
    return record
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"cannot read the LoRA record {file}: {e}") from e


def check_base(record: dict[str, Any], where: str) -> str | None:
  """The base's path (None: a random base), after checking it is still the same model."""
  base = record["base"]
  if base["kind"] == "random":
    return None
  path = base["path"]
  if not os.path.isdir(path):
    raise CheckpointError(
      f"{where} holds LoRA adapters of the base model {path}, which is gone; restore it there"
    )
  got = fingerprint(path)
  if got != base["fingerprint"]:
    raise CheckpointError(
      f"{where} holds LoRA adapters of the base model {path}, but that folder now holds "
      f"another model (fingerprint {got}, recorded {base['fingerprint']})"
    )
  return path


def restore_adapters(params_dir: str) -> dict[str, Any]:
  """A LoRA step's adapters (small) as float32 numpy arrays."""
  return restore_on_host(params_dir, "float32")
