"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop cleanly.

Host work (reading the next batch, hashing it) overlaps with the device's step: metrics are
only pulled to the host every ``log.every`` steps, which is also when the loop checks the
non-finite counter (so a run of skipped steps is noticed within ``log.every`` steps; skipped
steps change nothing, so the state stays the last good one). SIGTERM (or JAX's preemption
notice on multi-host jobs) makes the loop save a checkpoint at the next step boundary and
return with ``preempted: true``.

Every second of the run is booked in the workdir's goodput ledger (``train/goodput.py``):
productive step time, or badput by cause (start-up and restore, compilation, data waits,
checkpoint saves, redone steps, evaluation); the totals over all sessions close the summary.
Before the loop (restore, compile) the command's handler (``preemption.py``) stops at once instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from typing import Any

from absl import logging
import jax

from astrollama_jax import sharding
from astrollama_jax.checkpoints import loader, lora_base
from astrollama_jax.model import llama
from astrollama_jax.perf import flops
from astrollama_jax.train import data, distributed, goodput, resolve, wandb_log, watchdog
from astrollama_jax.train import program as program_lib
from astrollama_jax.train import step as step_lib
from astrollama_jax.train.metrics import MetricsLogger
from astrollama_jax.train.run_state import Checkpointer


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class _Preemption:
  """SIGTERM on a single process (our handler) or JAX's multi-host preemption sync point."""

  def __init__(self, ckpt: Checkpointer):
    self.ckpt, self.flag, self._old = ckpt, False, None
    if jax.process_count() == 1:
      self._old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    logging.warning("SIGTERM: will checkpoint and stop after the current step")
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return self.ckpt.reached_preemption(step)

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def evaluate(config: Any, eval_step: Any, params: Any, mesh: Any) -> dict[str, float] | None:
  """Mean NLL and perplexity over the validation split (or its first ``eval.batches``).

  Every validation record is read exactly once: the last, partial batch of a process is padded
  with empty rows (no loss), and a process whose records ran out feeds empty batches until every
  process's have (each process reads its own share, ``train/data.py``).
  """
  if not data.has_split(config, "validation"):
    return None
  e, t = config.eval, config.train
  batch = e.batch_size or t.global_batch_size // t.grad_accum_steps
  it = iter(
    data.make_dataset(
      config, "validation", batch_size=batch, num_epochs=1, shuffle=False, drop_remainder=False
    )
  )
  rows = data.local_batch_size(batch)
  total = count = 0.0
  n, done = 0, False
  while not e.batches or n < e.batches:
    watchdog.beat(f"evaluation batch {n}")
    local = None if done else next(it, None)
    done = local is None
    if distributed.on_every_process(done):  # every process runs the same number of eval steps
      break
    local = data.pad_rows(local, rows, config.data.seq_len)
    s, c = eval_step(params, data.to_global(mesh, local))
    total, count, n = total + float(s), count + float(c), n + 1
  if count == 0:
    logging.warning("validation split gave no batch of %d rows: no evaluation", batch)
    return None
  loss = total / count
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "batches": n}


def _init_state(config: Any, program: program_lib.TrainProgram) -> Any:
  if config.init_checkpoint:
    dtype = program.base_dtype if program.lora is not None else program.cfg.param_dtype
    loaded = loader.load_model(config.init_checkpoint, mesh=program.mesh, dtype=dtype)
    logging.info("initialised from %s (%s)", config.init_checkpoint, loaded.kind)
    return program.init_state(config.seed, loaded.params)
  return program.init_state(config.seed)


def _lora_record(config: Any, workdir: str, program: program_lib.TrainProgram) -> dict | None:
  """LoRA: the workdir's record of its base (written on the first run, checked on a resume)."""
  if program.lora is None:
    return None
  record = lora_base.read(workdir) if resolve.has_checkpoints(workdir) else None
  if record is None:
    record = {
      "spec": program.lora,
      "base_dtype": program.base_dtype,
      "base": lora_base.base_record(config.init_checkpoint, config.seed),
    }
    if jax.process_index() == 0:
      lora_base.write(workdir, program.lora, program.base_dtype, record["base"])
  elif (record["spec"], record["base_dtype"]) != (program.lora, program.base_dtype):
    raise ValueError(
      f"{workdir} holds adapters {record['spec']} over a {record['base_dtype']} "
      f"base, the config asks for {program.lora} over {program.base_dtype}; "
      "use a fresh --workdir"
    )
  return record


def _frozen_base(record: dict, workdir: str, program: program_lib.TrainProgram) -> Any:
  """A resumed LoRA run's base, re-read from where its record says (or rebuilt from its seed)."""
  path = lora_base.check_base(record, workdir)
  if path is not None:
    return loader.load_model(path, mesh=program.mesh, dtype=program.base_dtype).params
  cfg, seed, dtype = program.cfg, record["base"]["seed"], program.base_dtype
  make = lambda: jax.tree.map(lambda x: x.astype(dtype), llama.init_params(cfg, seed=seed))  # noqa: E731
  return jax.jit(make, out_shardings=program.shardings.frozen)()


def train(config: Any, workdir: str, started: float | None = None) -> dict[str, Any]:
  """Run (or resume) the training job ``config`` in ``workdir``; returns the summary.

  ``started``: when this session began (the command passes its process's start time, so the
  goodput ledger books interpreter start-up too); default now.
  """
  started = time.time() if started is None else started
  ledger = goodput.Ledger(workdir, started, enabled=jax.process_index() == 0)
  ledger.add("startup", time.time() - started)  # before this call: imports, jax.distributed
  with contextlib.ExitStack() as setup:  # start-up ends where the first step begins
    setup.enter_context(ledger.time("startup"))
    resolve.check_inputs(config, workdir)
    mesh = sharding.make_mesh(tuple(config.mesh))
    with sharding.use_rules(resolve.sharding_rules(config)):  # for params and activations alike
      return _train(config, workdir, mesh, started, ledger, setup)


def _train(
  config: Any,
  workdir: str,
  mesh: Any,
  started: float,
  ledger: goodput.Ledger,
  setup: contextlib.ExitStack,
) -> dict[str, Any]:
  cfg, cfg_source = resolve.model_config(config, workdir)
  tok_path = resolve.tokenizer_path(config, workdir)
  resolve.check_compatible(cfg, config, tok_path)
  resolve.check_batch_layout(config, dict(mesh.shape))
  if tok_path and not config.data.tokenizer_path:
    config.data.tokenizer_path = tok_path
  if config.data.kind == "sft" and not config.data.sft.chat_template:  # recorded by name
    from astrollama_jax.data import chat_templates

    config.data.sft.chat_template = chat_templates.for_tokenizer(tok_path).name
  resolve.bootstrap_workdir(workdir, config, cfg, tok_path)
  logging.info(
    "model %s (%.1fM params) from %s on mesh %s",
    cfg,
    cfg.num_params() / 1e6,
    cfg_source,
    dict(mesh.shape),
  )
  wandb_run = None
  if jax.process_index() == 0:
    wandb_run = wandb_log.start(config.log, workdir, json.loads(config.to_json_best_effort()))
  steps = resolve.total_steps(config)
  with ledger.time("compilation"):
    program = program_lib.compile_train_step(config, mesh, cfg=cfg, total_steps=steps)
  mem = program.compiled.memory_analysis()
  if mem is not None:
    logging.info(
      "train step per-device memory: args %.2f GB, temp %.2f GB, out %.2f GB",
      mem.argument_size_in_bytes / 1e9,
      mem.temp_size_in_bytes / 1e9,
      mem.output_size_in_bytes / 1e9,
    )
  lora_record = _lora_record(config, workdir, program)
  ckpt = Checkpointer(
    workdir,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
    identity=data.run_identity(config),
  )
  ckpt.check_free_space(program.state_bytes())
  train_iter = iter(data.make_dataset(config, "train", num_epochs=None))
  step_flops = flops.training_flops(cfg, config.train.global_batch_size, config.data.seq_len).total
  summary: dict[str, Any] = {"workdir": workdir, "total_steps": steps, "params": cfg.num_params()}
  if program.lora is not None:
    summary["lora_params"] = sum(x.size for x in jax.tree.leaves(program.state_shapes.params))
  with jax.set_mesh(mesh):
    t0 = time.time()
    restored = ckpt.restore_latest(program.abstract_state, train_iter)
    if restored is not None:
      state, meta = restored
      if lora_record is not None:
        state = state.replace(frozen=_frozen_base(lora_record, workdir, program))
      start = meta["step"]
      summary.update(resumed_from=start, eval_start=meta.get("eval_start"))
    else:
      state, start, meta = _init_state(config, program), 0, {}
    ledger.resumed(start)
    jax.block_until_ready(state)
    summary["state_s"] = round(time.time() - t0, 2)  # restore or initialise
    summary["compile_s"] = program.compile_s
    eval_step = step_lib.make_eval_step(
      cfg, program.model_params(program.shardings), mesh, loss_chunk=config.loss.chunk_size
    )
    logger = MetricsLogger(workdir, steps, start, wandb_run=wandb_run)
    preempt = _Preemption(ckpt)
    setup.close()
    try:
      with ledger.time("evaluation"):
        if start == 0 and config.eval.at_start:
          summary["eval_start"] = evaluate(config, eval_step, program.model_params(state), mesh)
          if summary["eval_start"]:
            logger.write(0, "eval", summary["eval_start"])
      meta = {"eval_start": summary.get("eval_start")}
      loop = _Run(
        config, program, ckpt, logger, preempt, eval_step, mesh, steps, step_flops, ledger
      )
      summary.update(_run_steps(loop, state, train_iter, start, meta))
    finally:  # saves finish under the loop's handler: a SIGTERM now must not cut them short
      try:
        with ledger.time("checkpoint_save"):  # the last save's background writes
          ckpt.close()
      finally:
        preempt.close()
        summary["goodput"] = ledger.summary()
        ledger.flush()
        logger.write(summary.get("final_step", start), "goodput", goodput.flat(summary["goodput"]))
        logger.close(goodput.flat(summary["goodput"]))
  summary["wall_s"] = round(time.time() - started, 1)
  return summary


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the step loop works with, fixed for the whole run (``train`` sets it up)."""

  config: Any
  program: Any
  ckpt: Any
  logger: Any
  preempt: Any
  eval_step: Any
  mesh: Any
  steps: int
  step_flops: float
  ledger: goodput.Ledger


def _run_steps(loop: _Run, state, train_iter, start, meta) -> dict[str, Any]:
  ev_cfg, ck = loop.config.eval, loop.config.checkpoint
  pending: list[Any] = []
  out: dict[str, Any] = {"preempted": False}
  mark, mark_step = time.time(), start
  step = start
  ledger = loop.ledger
  while step < loop.steps:
    watchdog.beat(f"step {step}")
    with ledger.time("data_wait"):
      local = next(train_iter, None)
    if local is None:
      raise RuntimeError(f"the training data ran out at step {step} of {loop.steps}")
    with ledger.time("step"):
      state, step, pending, out = _step(loop, state, local, step, pending, out, mark, mark_step)
    if not pending:  # metrics were fetched: the steps up to here are done and timed
      mark, mark_step = time.time(), step
      ledger.stepped(step)
      ledger.flush()
    last = step == loop.steps
    if ev_cfg.every and step % ev_cfg.every == 0 and not last:
      with ledger.time("evaluation"):
        ev = evaluate(loop.config, loop.eval_step, loop.program.model_params(state), loop.mesh)
      if ev:
        loop.logger.write(step, "eval", ev)
    if loop.preempt.reached(step):
      _save(loop, step, state, train_iter, meta)
      loop.logger.write(step, "event", {"event": "preempted"})
      logging.warning("preempted: checkpoint of step %d saved; exiting", step)
      out["preempted"] = True
      break
    if (ck.every and step % ck.every == 0) or last:
      _save(loop, step, state, train_iter, meta)
  out["final_step"] = step
  out["nonfinite_total"] = int(jax.device_get(state.nonfinite_total))
  if not out["preempted"] and ev_cfg.at_end:
    with ledger.time("evaluation"):
      out["eval"] = evaluate(
        loop.config, loop.eval_step, loop.program.model_params(state), loop.mesh
      )
    if out["eval"]:
      loop.logger.write(step, "eval", out["eval"])
  return out


def _save(loop: _Run, step: int, state: Any, train_iter: Any, meta: dict[str, Any]) -> None:
  """Start checkpoint ``step``, with the goodput books up to it (and a ``goodput`` record)."""
  with loop.ledger.time("checkpoint_save"):
    loop.ckpt.save(step, state, train_iter, meta)
  loop.ledger.checkpointed(step, keep=loop.config.checkpoint.keep)
  loop.ledger.flush()
  loop.logger.write(step, "goodput", goodput.flat(loop.ledger.summary()))


def _step(loop: _Run, state, local, step, pending, out, mark, mark_step):
  """One optimizer step; every ``log.every`` steps its metrics are fetched and logged (then
  ``pending`` comes back empty)."""
  t, log = loop.config.train, loop.config.log
  n_dev, kind = jax.device_count(), jax.devices()[0].device_kind
  tokens_per_step = t.global_batch_size * loop.config.data.seq_len
  if log.batch_hashes:
    loop.logger.write(step + 1, "batch", {"hash": data.batch_hash(local)})
  state, metrics = loop.program.compiled(state, data.to_global(loop.mesh, local))
  pending = [*pending, metrics]
  step += 1
  if step % log.every == 0 or step == loop.steps:
    fetched = jax.device_get(pending)
    now = time.time()
    dt = (now - mark) / max(step - mark_step, 1)
    m = {k: float(fetched[-1][k]) for k in ("loss", "grad_norm", "lr")}
    m.update(
      skipped=int(sum(f["skipped"] for f in fetched)),
      step_time_s=dt,
      tokens_per_s=tokens_per_step / dt,
      loss_tokens=float(fetched[-1]["tokens"]),
    )
    util = flops.mfu(loop.step_flops, dt, n_dev, kind)
    if util is not None:
      m["mfu"] = util
    loop.logger.write(step, "train", m)
    loop.logger.advance(step - mark_step, {"loss": m["loss"], "lr": m["lr"]})
    out.update(
      train_loss=m["loss"], step_time_s=dt, tokens_per_s=m["tokens_per_s"], mfu=m.get("mfu")
    )
    pending = []
    run = int(jax.device_get(state.nonfinite_run))
    if run >= t.max_consecutive_nonfinite:
      raise NonFiniteError(
        f"{run} consecutive steps with a non-finite loss or gradient up to step "
        f"{step}; stopping (latest checkpoint: {loop.ckpt.all_steps()[-1:]})"
      )
  return state, step, pending, out
