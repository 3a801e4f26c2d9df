"""TPU planning: slice names, kernel counting, and libtpu's real plan of a tiny train step.

The compile test needs the ``libtpu`` package (no TPU): it is skipped, saying so, without it.
"""

import pytest

from astrollama_jax.perf import tpu_plan
from astrollama_jax.train.defaults import base_config


@pytest.mark.parametrize(
  "name,topology,chips,config,hbm_gib",
  [
    ("v5p-8", "v5:2x2x1", 4, "megacore", 95),
    ("v5p-128", "v5:4x4x4", 64, "megacore", 95),
    ("v4-8", "v4:2x2x1", 4, "megacore", 32),
    ("v4-256", "v4:4x4x8", 128, "megacore", 32),
    ("v4-64", "v4:2x4x4", 32, "megacore", 32),
    ("v5e-1", "v5e:1x1", 1, "default", 16),
    ("v5e-4", "v5e:2x2", 4, "default", 16),
    ("v5e-8", "v5e:2x4", 8, "default", 16),
    ("v6e-256", "v6e:16x16", 256, "default", 32),
    ("2xv5p-8", "v5:2x2x1", 8, "megacore", 95),
  ],
)
def test_parse_topology(name, topology, chips, config, hbm_gib):
  topo = tpu_plan.parse_topology(name)
  assert (topo.topology_name, topo.chips, topo.chip_config_name) == (topology, chips, config)
  assert topo.hbm_bytes == hbm_gib * 2**30


@pytest.mark.parametrize("bad", ["v5p-7", "v3-8", "tpu", "v5e-12", "0xv5e-4"])
def test_parse_topology_rejects(bad):
  with pytest.raises(ValueError):
    tpu_plan.parse_topology(bad)


def test_kernel_calls_counts_fused_custom_calls_only():
  text = (
    '%a = custom-call(%x), custom_call_target="tpu_custom_call"\n'
    '%b = custom-call(%y), custom_call_target="tpu_custom_call"\n'
    '%c = custom-call(%z), custom_call_target="Sharding"\n'
    '%d = custom-call(%w), custom_call_target="__cudnn$fmhaSoftmax"\n'
  )
  assert tpu_plan.kernel_calls(text) == 3
  assert tpu_plan.kernel_calls("%c = add(%a, %b)") == 0


def _tiny_config(impl):
  c = base_config()
  c.model.preset = "tiny"  # widened to head_dim 128, the kernels' native tile
  c.model.dim, c.model.n_heads, c.model.n_kv_heads = 256, 2, 1
  c.model.remat_policy = "full"
  c.model.attention_impl = impl
  c.mesh = (1, -1, 1)
  c.data.seq_len = 256
  c.train.global_batch_size = 8
  return c


@pytest.mark.skipif(
  not tpu_plan.libtpu_available(),
  reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler",
)
def test_tiny_train_step_plan_on_v5e_4():
  plans = {
    impl: tpu_plan.train_step_plan(_tiny_config(impl), "v5e-4") for impl in ("splash", "xla")
  }
  for impl, plan in plans.items():
    assert plan["chips"] == 4 and plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert plan["argument_bytes"] > 0 and plan["temp_bytes"] > 0 and plan["code_bytes"] > 0
    assert plan["peak_bytes"] > plan["argument_bytes"] and plan["fits"] is True
    assert plan["attention"] == impl
  # Splash shows up as Mosaic custom calls (forward, its remat recomputation, dq, dkv).
  assert plans["splash"]["kernel_calls"] > 0
  assert plans["xla"]["kernel_calls"] == 0


@pytest.mark.skipif(
  not tpu_plan.libtpu_available(),
  reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler",
)
def test_plan_over_the_chip_reports_not_fitting():
  """4096 rows of unchunked 32k-vocabulary logits cannot fit one 16 GiB v5e chip."""
  c = _tiny_config("xla")
  c.train.global_batch_size = 4096
  plan = tpu_plan.train_step_plan(c, "v5e-1")
  assert plan["fits"] is False
  assert plan["temp_bytes"] > plan["available_bytes"] > 0
  assert "RESOURCE_EXHAUSTED" in plan["error"]


@pytest.mark.skipif(
  not tpu_plan.libtpu_available(),
  reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler",
)
def test_aot_command_compiles_for_a_topology():
  """``aot --topology`` compiles the trainer's step with libtpu; the last line names the plan."""
  import json
  import subprocess
  import sys

  from helpers import REPO
  from helpers_train import train_env

  args = [
    "--config=configs/demo.py",
    "--topology=v5e-4",
    "--config.model.attention_impl=auto",
    "--config.model.dim=256",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.data.seq_len=256",
    "--config.train.global_batch_size=8",
  ]
  out = subprocess.run(
    [sys.executable, "-m", "astrollama_jax", "aot", *args],
    cwd=REPO,
    env=train_env(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["target"] == "v5e-4" and plan["attention"] == "splash" and plan["fits"] is True
  assert 0 < plan["peak_gib"] < plan["hbm_gib"] == 16 and plan["kernel_calls"] > 0
  assert "fused-kernel calls" in out.stdout
