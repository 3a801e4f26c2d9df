"""The one compiled train step of a config: what ``train``, ``aot`` and ``bench`` all run.

``compile_train_step(config, mesh)`` builds, from the training config alone, the optimizer and
schedule, the abstract train state and its shardings (by the config's sharding rules), the
abstract batch (``packing.BATCH_SPEC``) and the jitted step, then lowers and compiles it ahead
of time. The trainer runs that program; ``aot`` reads its memory plan for fake devices; the
benchmark times it. So a number from either of the latter is a number for the former.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
from jax.sharding import Mesh
import optax

from astrollama_jax import sharding
from astrollama_jax.model import llama
from astrollama_jax.model import lora as lora_lib
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.train import optimizer, resolve
from astrollama_jax.train import state as state_lib
from astrollama_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """A compiled train step with everything that went into it."""

  cfg: LlamaConfig
  mesh: Mesh
  rules: sharding.Rules
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shapes: state_lib.TrainState  # ShapeDtypeStructs
  shardings: state_lib.TrainState  # NamedShardings
  batch: dict[str, jax.ShapeDtypeStruct]  # with their shardings
  lowered: Any
  compiled: Any
  compile_s: float
  lora: lora_lib.LoraSpec | None = None  # adapters trained over a frozen base (config.lora)
  base_dtype: str | None = None  # the frozen base's dtype (with lora)

  @property
  def abstract_state(self) -> state_lib.TrainState:
    """The state's shapes carrying their shardings (for restoring a checkpoint)."""
    return state_lib.with_shardings(self.state_shapes, self.shardings)

  def state_bytes(self) -> int:
    """Bytes of what a checkpoint holds (parameters or adapters, optimizer state), whole mesh."""
    leaves = jax.tree.leaves((self.state_shapes.params, self.state_shapes.opt_state))
    return sum(x.size * x.dtype.itemsize for x in leaves)

  def model_params(self, state: state_lib.TrainState) -> Any:
    """What eval runs on: the params, or the frozen base with the adapters."""
    return state_lib.model_params(state, self.lora)

  def init_state(self, seed: int, params: Any = None) -> state_lib.TrainState:
    """A fresh state around ``params`` (with LoRA: the base), or around a random init made
    inside one compiled program (each device makes only its own shards)."""
    if params is None:
      cfg = self.cfg
      params = lambda: llama.init_params(cfg, seed=seed)  # noqa: E731
    lora = None if self.lora is None else (self.cfg, self.lora, self.base_dtype)
    with sharding.use_rules(self.rules), jax.set_mesh(self.mesh):
      return state_lib.create_state(params, self.tx, self.shardings, seed=seed, lora=lora)


def compile_train_step(
  config: Any,
  mesh: Mesh,
  *,
  cfg: LlamaConfig | None = None,
  total_steps: int = 1,
  compile: bool = True,
) -> TrainProgram:
  """Build and compile ``config``'s train step on ``mesh`` (only lower it: ``compile=False``,
  for a caller that compiles it itself, e.g. for a TPU slice that may not hold it).

  ``cfg`` is the model (default: ``model.preset`` with the config's overrides; the trainer
  passes the one it resolved from a checkpoint); ``total_steps`` sets the schedule's length,
  which changes no shape. The config's sharding rules are in force for the state's shardings
  and while the step is traced, so both follow the same table.
  """
  cfg = cfg or resolve.preset_model_config(config)
  t = config.train
  lora = lora_lib.spec_from_config(config)
  base_dtype = config.lora.base_dtype if lora is not None else None
  with sharding.use_rules(resolve.sharding_rules(config)) as rules, jax.set_mesh(mesh):
    tx, schedule = optimizer.make_optimizer(config, total_steps)
    shapes, shardings = state_lib.abstract_state(cfg, tx, mesh, lora, base_dtype)
    batch = step_lib.abstract_batch(t.global_batch_size, config.data.seq_len, mesh)
    train_step = step_lib.make_train_step(
      cfg,
      tx,
      schedule,
      shardings,
      mesh,
      grad_accum=t.grad_accum_steps,
      loss_chunk=config.loss.chunk_size,
      lora=lora,
    )
    t0 = time.time()
    lowered = train_step.lower(state_lib.with_shardings(shapes, shardings), batch)
    compiled = lowered.compile() if compile else None
  return TrainProgram(
    cfg=cfg,
    mesh=mesh,
    rules=rules,
    tx=tx,
    schedule=schedule,
    state_shapes=shapes,
    shardings=shardings,
    batch=batch,
    lowered=lowered,
    compiled=compiled,
    compile_s=round(time.time() - t0, 2),
    lora=lora,
    base_dtype=base_dtype,
  )
