"""Before the first step: the model config, the workdir files and the number of steps.

The workdir is made self-describing (``model_config.json``, the tokenizer, ``config.json``)
so that ``checkpoints.loader.load_model(WORKDIR)``, export, eval and a resumed run all read it
without the original config file.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np

from astrollama_jax import sharding
from astrollama_jax.checkpoints import layout, locate, writer
from astrollama_jax.model.config import POLICY_FIELDS, LlamaConfig, get_config
from astrollama_jax.train import config_values, data
from astrollama_jax.train.run_state import CHECKPOINTS_DIR
from astrollama_jax.util import diskspace


def arch_overrides(config: Any) -> dict[str, Any]:
  return {
    k: v
    for k, v in config.model.items()
    if k != "preset" and k not in POLICY_FIELDS and v is not None
  }


def policy(config: Any) -> dict[str, Any]:
  return {k: config.model[k] for k in POLICY_FIELDS}


def preset_model_config(config: Any) -> LlamaConfig:
  """``model.preset`` with the config's architecture overrides and execution policy."""
  return get_config(config.model.preset, **arch_overrides(config), **policy(config))


def sharding_rules(config: Any) -> sharding.Rules:
  """The run's logical-axis -> mesh-axis table (``config.sharding_rules``)."""
  return sharding.rules_from_config(config.sharding_rules, "config.sharding_rules")


def check_inputs(config: Any, workdir: str) -> None:
  """Fail first, in one line, when the config leaves out what the run reads: the data of its
  ``data.kind``, the tokenizer, an ``init_checkpoint`` the config asks for; or sets a number out
  of its range (``config_values``)."""
  kind = data.data_kind(config)
  config_values.check(config)
  missing = []
  if config.init_checkpoint is None:
    missing.append("--config.init_checkpoint=DIR (the model to start from; '' for a random init)")
  missing += [flag for key, flag in kind.needs if not _get(config.data, key)]
  # (an init_checkpoint still to be named may bring its own tokenizer)
  if (
    kind.tokenized
    and not config.data.tokenizer_path
    and config.init_checkpoint is not None
    and tokenizer_path(config, workdir) is None
  ):
    missing.append("--config.data.tokenizer_path=FILE (tokenizer.model or tokenizer.json)")
  if missing:
    raise ValueError(
      f"the config leaves out what a {config.data.kind!r} run needs: pass " + " and ".join(missing)
    )
  t = config.train
  if t.num_steps < 0 or (t.num_steps == 0 and t.num_epochs <= 0):
    raise ValueError(
      f"train.num_steps={t.num_steps}, train.num_epochs={t.num_epochs}: give a positive "
      "train.num_steps, or train.num_steps=0 and a positive train.num_epochs"
    )
  kind.check(config)


def _get(section: Any, dotted: str) -> Any:
  for key in dotted.split("."):
    section = section[key]
  return section


def _with_overrides(cfg: LlamaConfig, config: Any, source: str) -> LlamaConfig:
  """``cfg`` (from a checkpoint) with the run's policy; architecture overrides must agree."""
  clash = {
    k: (getattr(cfg, k), v) for k, v in arch_overrides(config).items() if getattr(cfg, k) != v
  }
  clash.pop("max_seq_len", None)  # a positional limit, not a weight shape: the run's value wins
  if clash:
    raise ValueError(
      f"config.model overrides {sorted(clash)} contradict {source}: "
      + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in clash.items())
    )
  extra = {k: v for k, v in arch_overrides(config).items() if k == "max_seq_len"}
  return cfg.replace(**policy(config), **extra)


def has_checkpoints(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
  return os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))


def model_config(config: Any, workdir: str) -> tuple[LlamaConfig, str]:
  """(model config, where it came from): the workdir's when resuming, else the init checkpoint's
  architecture, else ``model.preset`` with overrides; the run's execution policy on top."""
  saved = os.path.join(workdir, layout.CONFIG_FILE)
  if has_checkpoints(workdir) and os.path.isfile(saved):
    return _with_overrides(locate.read_model_config(workdir), config, saved), saved
  if config.init_checkpoint:
    kind, root, _, _ = locate.locate(config.init_checkpoint)
    if kind == "hf":
      from astrollama_jax.formats import hf

      cfg = hf.read_hf_config(root)
    else:
      cfg = locate.read_model_config(root)
    return _with_overrides(cfg, config, config.init_checkpoint), config.init_checkpoint
  return preset_model_config(config), f"preset {config.model.preset}"


def tokenizer_path(config: Any, workdir: str) -> str | None:
  """The data's tokenizer, else the workdir's copy, else the init checkpoint's."""
  candidates = [config.data.tokenizer_path, layout.tokenizer_in(workdir)]
  if config.init_checkpoint:
    candidates.append(layout.tokenizer_in(locate.locate(config.init_checkpoint)[1]))
  for path in candidates:
    if path and os.path.isfile(path):
      return path
  if config.data.tokenizer_path:
    raise FileNotFoundError(f"config.data.tokenizer_path {config.data.tokenizer_path} not found")
  return None


def check_compatible(cfg: LlamaConfig, config: Any, tok_path: str | None) -> None:
  """Fail early, naming the setting, on combinations that cannot train."""
  if config.data.seq_len > cfg.max_seq_len:
    raise ValueError(
      f"config.data.seq_len {config.data.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}"
    )
  t, chunk = config.train, config.loss.chunk_size
  if t.global_batch_size % t.grad_accum_steps:
    raise ValueError(
      f"train.global_batch_size {t.global_batch_size} is not divisible by "
      f"train.grad_accum_steps {t.grad_accum_steps}"
    )
  if chunk and config.data.seq_len % chunk:
    raise ValueError(f"loss.chunk_size {chunk} does not divide data.seq_len {config.data.seq_len}")
  if data.data_kind(config).tokenized:
    from astrollama_jax.data import shards

    shards.check_layout(t.global_batch_size, data.data_shards(config), jax.process_count())
    if not tok_path:
      raise ValueError("no tokenizer: set config.data.tokenizer_path")
    from astrollama_jax.data.tokenizer import Tokenizer

    Tokenizer(tok_path).check_vocab(cfg.vocab_size)


def check_batch_layout(config: Any, mesh_shape: dict[str, int]) -> None:
  """Every batch the step sees must split evenly over the batch shards (data x fsdp) of the mesh:
  the global batch, each micro-batch and the eval batch (else XLA would replicate rows)."""
  shards = mesh_shape["data"] * mesh_shape["fsdp"]
  t = config.train
  micro = t.global_batch_size // t.grad_accum_steps
  batches = {
    "train.global_batch_size": t.global_batch_size,
    "micro-batch (global_batch_size / grad_accum_steps)": micro,
    "eval.batch_size": config.eval.batch_size or micro,
  }
  for name, rows in batches.items():
    if rows % shards:
      raise ValueError(
        f"{name} = {rows} rows cannot be split over the {shards} batch shards "
        f"(data x fsdp) of mesh {dict(mesh_shape)}; choose a batch, "
        "train.grad_accum_steps or config.mesh that divide"
      )


def bootstrap_workdir(workdir: str, config: Any, cfg: LlamaConfig, tok_path: str | None) -> None:
  """Write model_config.json, the tokenizer and config.json (process 0); refuse a workdir
  whose checkpoints belong to a different architecture."""
  os.makedirs(workdir, exist_ok=True)
  saved = os.path.join(workdir, layout.CONFIG_FILE)
  if has_checkpoints(workdir) and os.path.isfile(saved):
    old = locate.read_model_config(workdir)
    diff = [
      k
      for k, v in cfg.to_dict().items()
      if k not in POLICY_FIELDS + ("max_seq_len",) and getattr(old, k) != v
    ]
    if diff:
      raise ValueError(
        f"{workdir} holds checkpoints of another model ({saved} differs in {diff}); "
        "use a fresh --workdir"
      )
  if jax.process_index() == 0:
    own = layout.tokenizer_in(workdir)
    same_tok = tok_path and own and os.path.abspath(tok_path) == os.path.abspath(own)
    writer.write_side_files(workdir, cfg, None if same_tok else tok_path)
    diskspace.write_atomic(
      os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True)
    )


def total_steps(config: Any) -> int:
  """``train.num_steps``, or ``train.num_epochs`` passes over the training split (counted)."""
  t = config.train
  if t.num_steps > 0:
    return int(t.num_steps)
  batches_per_epoch = data.data_kind(config).batches_per_epoch
  if batches_per_epoch is not None:
    per_epoch = batches_per_epoch(config)
  else:
    logging.info("counting the batches of one epoch (set train.num_steps to skip this)")
    per_epoch = data.count_batches(iter(data.make_dataset(config, "train", num_epochs=1)))
    if jax.process_count() > 1:  # every process must run the same number of steps
      from jax.experimental import multihost_utils

      per_epoch = int(np.min(multihost_utils.process_allgather(np.asarray(per_epoch))))
  steps = int(per_epoch * t.num_epochs)
  if steps < 1:
    raise ValueError(
      f"the training split yields no full batch of {t.global_batch_size} x "
      f"{config.data.seq_len} tokens; lower train.global_batch_size or data.seq_len"
    )
  return steps
