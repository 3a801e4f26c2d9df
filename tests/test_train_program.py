"""One compiled train step for train, aot and bench; sharding rules as configuration."""

import types

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from astrollama_jax import sharding
from astrollama_jax.data.packing import BATCH_SPEC
from astrollama_jax.perf import bench_jax, cpu_plan
from astrollama_jax.train import loop, resolve
from astrollama_jax.train import program as program_lib
from astrollama_jax.train.defaults import base_config

STEPS = 2


def _config(**rules):
  """A tiny synthetic run on the 8 test devices as (data 2, fsdp 2, tensor 2)."""
  c = base_config()
  c.mesh = (2, 2, 2)
  c.model.preset = "tiny"
  c.model.vocab_size = 1024
  c.model.compute_dtype = "float32"
  c.data.kind = "synthetic"
  c.data.seq_len = 32
  c.data.synthetic.num_rows = 64
  c.train.global_batch_size = 8
  c.train.grad_accum_steps = 2
  c.train.num_steps = STEPS
  c.loss.chunk_size = 16
  c.eval.at_start = c.eval.at_end = False
  c.eval.every = 0
  c.checkpoint.async_save = False
  c.sharding_rules.update(rules)
  return c


def _specs(tree):
  return jax.tree.map(lambda s: s.spec, tree)


@pytest.fixture()
def programs(monkeypatch):
  """Every TrainProgram built while the test runs."""
  built = []
  real = program_lib.compile_train_step

  def spy(*args, **kwargs):
    built.append(real(*args, **kwargs))
    return built[-1]

  monkeypatch.setattr(program_lib, "compile_train_step", spy)
  return built


def test_train_aot_and_bench_compile_the_same_step(tmp_path, programs):
  config = _config()
  summary = loop.train(config, str(tmp_path / "run"))
  assert summary["final_step"] == STEPS
  plan = cpu_plan.memory_plan(config)
  assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and plan["micro_batch"] == 4
  mesh = bench_jax.make_bench_mesh(config.mesh)
  batch = bench_jax.synthetic_batch(1024, 8, 32, seed=0)
  cfg = bench_jax.model_config(config, config.data.seq_len)
  timed = bench_jax.jax_train(config, cfg, types.SimpleNamespace(steps=1, warmup=1), batch, mesh)
  assert timed["timed_steps"] == 1 and np.isfinite(timed["final_loss"])

  trained, planned, benched = programs
  text = trained.lowered.as_text()
  assert planned.lowered.as_text() == text and benched.lowered.as_text() == text
  for other in (planned, benched):
    assert other.cfg == trained.cfg and other.rules == trained.rules
    assert _specs(other.shardings) == _specs(trained.shardings)
    assert _specs(other.compiled.input_shardings) == _specs(trained.compiled.input_shardings)
    assert {k: (v.shape, v.dtype, v.sharding.spec) for k, v in other.batch.items()} == {
      k: (v.shape, v.dtype, v.sharding.spec) for k, v in trained.batch.items()
    }
  # The abstract batch is the one batch format: its keys and dtypes, split over (data, fsdp).
  assert {k: np.dtype(v.dtype) for k, v in trained.batch.items()} == {
    k: np.dtype(d) for k, d in BATCH_SPEC.items()
  }
  assert trained.batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(d) for k, d in BATCH_SPEC.items()}


def _mlp_activation_spec(config):
  """The spec ``constrain`` gives the MLP's hidden activations under ``config``'s rules."""
  mesh = sharding.make_mesh(tuple(config.mesh))
  with sharding.use_rules(resolve.sharding_rules(config)), jax.set_mesh(mesh):
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "seq", "act_mlp")))
    return f(np.ones((8, 4, 128), np.float32)).sharding.spec


def test_custom_rules_shard_params_and_activations_alike():
  default, custom = (
    _config(),
    _config(mlp="fsdp,tensor", act_mlp="fsdp,tensor", batch="data", embed=""),
  )
  mesh = sharding.make_mesh((2, 2, 2))
  before = program_lib.compile_train_step(default, mesh)
  after = program_lib.compile_train_step(custom, mesh)

  # Parameters: the MLP weights [layers, embed, mlp] follow the table they were built with.
  assert before.shardings.params["layers"]["mlp"]["gate_proj"].spec == P(None, "fsdp", "tensor")
  assert after.shardings.params["layers"]["mlp"]["gate_proj"].spec == P(
    None, None, ("fsdp", "tensor")
  )
  # Activations: the same rules, inside the compiled step and in constrain().
  assert _mlp_activation_spec(default) == P(("data", "fsdp"), None, "tensor")
  assert _mlp_activation_spec(custom) == P("data", None, ("fsdp", "tensor"))
  assert after.batch["tokens"].sharding.spec == P("data", None)
  assert '{"fsdp", "tensor"}]>' in after.lowered.as_text()
  assert '{"fsdp", "tensor"}]>' not in before.lowered.as_text()
  # A step compiled under one table keeps it, whatever table is in force when it is called.
  assert sharding.current_rules() == sharding.RULES


def test_bad_rules_are_named():
  with pytest.raises(
    ValueError, match=r"config.sharding_rules.mlp = 'tenser': give distinct mesh axes"
  ):
    resolve.sharding_rules(_config(mlp="tenser"))
  with pytest.raises(ValueError, match=r"config.sharding_rules.batch = 'data,data'"):
    resolve.sharding_rules(_config(batch="data,data"))
  assert sharding.rules_from_config(sharding.rules_to_config()) == sharding.RULES
