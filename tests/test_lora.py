"""LoRA: adapters over a frozen base: forward, state, memory, sharding, dropout, kill -9 resume."""

import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from astrollama_jax import sharding
from astrollama_jax.checkpoints import layout, loader, lora_base, reader, writer
from astrollama_jax.data.packing import BATCH_SPEC
from astrollama_jax.model import llama, lora, lora_params
from astrollama_jax.model.config import get_config
from astrollama_jax.train import loop
from astrollama_jax.train import program as program_lib
from astrollama_jax.train.defaults import base_config

CFG = get_config("tiny_gqa", compute_dtype="float32")
ALL = tuple(lora.TARGETS)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (2, 12)), jnp.int32)


def _perturbed(adapters, seed=1, scale=0.05):
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def test_fresh_adapters_leave_the_model_unchanged_and_merging_matches_the_branch():
  params = llama.init_params(CFG, seed=0)
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL)
  adapters = lora_params.init_adapters(CFG, spec, seed=0)
  base, _ = llama.apply(CFG, params, TOKENS)
  fresh, _ = llama.apply(CFG, lora.Adapted(params, adapters, spec), TOKENS)
  np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base))  # B = 0: exactly the base

  trained = _perturbed(adapters)
  branch, _ = llama.apply(CFG, lora.Adapted(params, trained, spec), TOKENS)
  merged, _ = llama.apply(CFG, lora.merge(params, trained, spec), TOKENS)
  assert float(jnp.abs(branch - base).max()) > 1e-2  # the adapters do something
  np.testing.assert_allclose(np.asarray(branch), np.asarray(merged), atol=2e-5)


def test_merge_is_w_plus_alpha_over_rank_a_at_b_and_touches_only_targets():
  params = llama.init_params(CFG, seed=0)
  spec = lora.LoraSpec(rank=2, alpha=6.0, targets=("q", "o", "down"))
  adapters = _perturbed(lora_params.init_adapters(CFG, spec, seed=0))
  merged = lora.merge(params, adapters, spec)
  w, ad = params["layers"]["attn"]["o_proj"], adapters["layers"]["attn"]["o_proj"]
  a, b = np.asarray(ad["lora_a"]), np.asarray(ad["lora_b"])  # [L,H,D,r], [L,r,E]
  want = np.asarray(w) + 3.0 * np.einsum("lhdr,lre->lhde", a, b)
  np.testing.assert_allclose(np.asarray(merged["layers"]["attn"]["o_proj"]), want, atol=1e-6)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    if not any(t in name for t in ("q_proj", "o_proj", "down_proj")):
      assert merged_leaf(merged, path) is leaf, name


def merged_leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_spec_checks_its_settings():
  with pytest.raises(ValueError, match="lora.targets"):
    lora.LoraSpec(rank=4, alpha=8.0, targets=("q", "qq"))
  with pytest.raises(ValueError, match="lora.dropout"):
    lora.LoraSpec(rank=4, alpha=8.0, dropout=1.0)
  c = base_config()
  assert lora.spec_from_config(c) is None  # rank 0: full fine-tuning
  c.lora.rank, c.lora.targets = 8, "q, k,down"
  assert lora.spec_from_config(c) == lora.LoraSpec(8, 16.0, 0.0, ("q", "k", "down"))


def _config(rank=4, mesh=(1, 1, 1)):
  c = base_config()
  c.mesh = mesh
  c.model.preset = "tiny"
  c.model.vocab_size = 1024
  c.model.compute_dtype = "float32"
  c.data.kind = "synthetic"
  c.data.seq_len = 32
  c.data.synthetic.num_rows = 64
  c.train.global_batch_size = 8
  c.train.grad_accum_steps = 2
  c.train.num_steps = 3
  c.eval.at_start = c.eval.at_end = False
  c.eval.every = 0
  c.checkpoint.async_save = False
  c.lora.rank = rank
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora.dropout = 0.1
  return c


def _arg_bytes(program):
  tree = (program.state_shapes, program.batch)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_only_adapters_have_optimizer_state_and_the_step_takes_less_memory():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh((1, 1, 1), devices)
  full = program_lib.compile_train_step(_config(rank=0), mesh)
  lo = program_lib.compile_train_step(_config(rank=4), mesh)
  spec = lo.lora
  adapter_shapes = {
    tuple(x.shape) for x in jax.tree.leaves(lora_params.adapter_shapes(lo.cfg, spec))
  }
  opt_shapes = [tuple(x.shape) for x in jax.tree.leaves(lo.state_shapes.opt_state)]
  assert {s for s in opt_shapes if s} == adapter_shapes  # moments: adapter-shaped only
  assert [s for s in opt_shapes if s not in adapter_shapes] == [()] * 2  # two step counters
  assert jax.tree.structure(lo.state_shapes.params) == jax.tree.structure(
    lora_params.adapter_shapes(lo.cfg, spec)
  )
  assert {x.dtype for x in jax.tree.leaves(lo.state_shapes.frozen)} == {jnp.dtype("bfloat16")}

  # The compiled step's arguments are exactly the state (+ batch): f32 params and two moments
  # for full fine-tuning, a bf16 base plus small adapters (and their moments) for LoRA.
  m_full, m_lora = full.compiled.memory_analysis(), lo.compiled.memory_analysis()
  assert m_full.argument_size_in_bytes == _arg_bytes(full)
  assert m_lora.argument_size_in_bytes == _arg_bytes(lo)
  n = full.cfg.num_params()
  adapters = lora_params.num_adapter_params(lo.cfg, spec)
  batch = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lo.batch))
  scalars = 4 + 4 + 3 * 4 + 8  # Adam's and the schedule's counts, step and skip counters, rng
  assert m_full.argument_size_in_bytes - batch == 12 * n + scalars
  assert m_lora.argument_size_in_bytes - batch == 2 * n + 12 * adapters + scalars
  assert lo.state_bytes() == 12 * adapters + 8  # what a LoRA checkpoint holds


def test_a_step_trains_the_adapters_and_leaves_the_base_bit_for_bit():
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  program = program_lib.compile_train_step(_config(), mesh)
  with jax.set_mesh(mesh):
    state = program.init_state(seed=0)
    base = jax.device_get(state.frozen)
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    batch = {
      k: jnp.asarray(rng.integers(1, 1000, (8, 32)), v)
      if k in ("tokens", "targets")
      else jnp.ones((8, 32), v)
      for k, v in BATCH_SPEC.items()
    }
    state, metrics = program.compiled(state, batch)
  assert int(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) > 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), base)
  after = jax.device_get(state.params)
  for key in ("q_proj", "o_proj"):
    assert np.abs(after["layers"]["attn"][key]["lora_b"]).max() > 0
    assert not np.any(before["layers"]["attn"][key]["lora_b"])


def test_adapters_shard_by_the_rules_on_eight_devices():
  mesh = sharding.make_mesh((2, 2, 2))
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL)
  sh = lora_params.adapter_shardings(CFG, spec, mesh)
  attn, mlp = sh["layers"]["attn"], sh["layers"]["mlp"]
  assert attn["q_proj"]["lora_a"].spec == P(None, "fsdp", None)
  assert attn["q_proj"]["lora_b"].spec == P(None, None, "tensor", None)
  assert attn["k_proj"]["lora_b"].spec == P(None, None, "tensor", None)
  assert attn["o_proj"]["lora_a"].spec == P(None, "tensor", None, None)
  assert attn["o_proj"]["lora_b"].spec == P(None, None, "fsdp")
  assert mlp["down_proj"]["lora_a"].spec == P(None, "tensor", None)
  assert mlp["up_proj"]["lora_b"].spec == P(None, None, "tensor")
  # The rank axis follows the table like any other: shard it and the adapters follow.
  rules = dict(sharding.RULES, lora_rank="data")
  with sharding.use_rules(tuple(rules.items())):
    sh = lora_params.adapter_shardings(CFG, spec, mesh)
  assert sh["layers"]["mlp"]["gate_proj"]["lora_a"].spec == P(None, "fsdp", "data")

  # The whole LoRA state on the mesh: adapters and their moments laid out alike, base as usual.
  program = program_lib.compile_train_step(_config(mesh=(2, 2, 2)), mesh)
  shardings = program.shardings
  mu = shardings.opt_state[1][0].mu
  assert mu["layers"]["attn"]["o_proj"]["lora_b"].spec == P(None, None, "fsdp")
  assert shardings.frozen["layers"]["attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
  with jax.set_mesh(mesh):
    state = program.init_state(seed=0)
  leaf = state.params["layers"]["attn"]["q_proj"]["lora_b"]
  assert leaf.sharding.spec == P(None, None, "tensor", None)
  assert leaf.addressable_shards[0].data.shape == (2, 4, 2, 16)  # 4 heads over tensor 2


def test_dropout_only_with_a_key_and_the_same_key_gives_the_same_masks():
  params = llama.init_params(CFG, seed=0)
  spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets=ALL)
  adapters = _perturbed(lora_params.init_adapters(CFG, spec, seed=0))
  nodrop = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=ALL)
  plain, _ = llama.apply(CFG, lora.Adapted(params, adapters, nodrop), TOKENS)
  evald, _ = llama.apply(CFG, lora.Adapted(params, adapters, spec), TOKENS)  # no key: eval
  np.testing.assert_array_equal(np.asarray(evald), np.asarray(plain))
  key = jnp.asarray([3, 4], jnp.uint32)
  a, _ = llama.apply(CFG, lora.Adapted(params, adapters, spec, rng=key), TOKENS)
  b, _ = llama.apply(CFG, lora.Adapted(params, adapters, spec, rng=key), TOKENS)
  c, _ = llama.apply(CFG, lora.Adapted(params, adapters, spec, rng=key + 1), TOKENS)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - plain).max()) > 1e-3 and float(jnp.abs(a - c).max()) > 1e-3


def test_a_lora_workdir_names_its_base_and_refuses_a_changed_one(tmp_path, tokenizer_path):
  cfg = get_config("tiny", vocab_size=1024)
  base_dir = writer.save_params(str(tmp_path / "base"), cfg, llama.init_params(cfg, seed=5))
  config = _config(mesh=(2, 2, 2))
  config.init_checkpoint = base_dir
  config.lora.base_dtype = "float32"
  summary = loop.train(config, str(tmp_path / "run"))
  assert summary["final_step"] == 3 and summary["lora_params"] == lora_params.num_adapter_params(
    cfg, lora.spec_from_config(config)
  )
  record = json.loads((tmp_path / "run" / lora_base.LORA_FILE).read_text())
  assert record["base"] == {
    "kind": "converted",
    "path": base_dir,
    "step": None,
    "fingerprint": lora_base.fingerprint(base_dir),
  }
  assert record["lora"]["targets"] == list(ALL) and record["base_dtype"] == "float32"
  step = tmp_path / "run" / "checkpoints" / "3"
  meta = reader.stored_metadata(str(step / "params"))
  assert set(meta["layers"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
  assert "embed" not in meta and set(meta["layers"]["attn"]["q_proj"]) == {"lora_a", "lora_b"}

  # A resumed run re-reads the base: a different model under that path is refused.
  other = get_config("tiny", vocab_size=1024)
  import shutil

  shutil.rmtree(base_dir)
  writer.save_params(base_dir, other, llama.init_params(other, seed=6))
  config.train.num_steps = 4
  with pytest.raises(layout.CheckpointError, match="now holds another model"):
    loop.train(config, str(tmp_path / "run"))


# --- kill -9 and resume, a real subprocess ------------------------------------------------------


def _adapters_and_opt(workdir, step):
  import orbax.checkpoint as ocp

  folder = os.path.join(workdir, "checkpoints", str(step))
  ckptr = ocp.StandardCheckpointer()
  return (
    ckptr.restore(os.path.join(folder, "params")),
    ckptr.restore(os.path.join(folder, "opt_state")),
  )


def test_kill9_and_resume_of_a_lora_run_is_bit_identical(tmp_path, tokenizer_path):
  from helpers_train import EVERY, RESUME_RUN, STEPS, kill_and_resume, records, train_cmd

  cfg = get_config("tiny", n_kv_heads=2)
  base_dir = writer.save_params(
    str(tmp_path / "base"), cfg, llama.init_params(cfg, seed=7), tokenizer_path
  )
  run = [
    *RESUME_RUN,
    "--config.data.kind=synthetic",
    "--config.data.synthetic.num_rows=64",
    f"--config.init_checkpoint={base_dir}",
    "--config.lora.rank=4",
    "--config.lora.dropout=0.2",
    "--config.lora.targets=q,v,o,up",
    "--config.train.grad_accum_steps=2",
  ]
  whole, broken, summary, killed_after = kill_and_resume(
    tmp_path, lambda workdir: train_cmd(workdir, *run), STEPS - 2
  )
  assert EVERY <= summary["resumed_from"] <= killed_after and summary["final_step"] == STEPS
  losses = {r["step"]: r["loss"] for r in records(whole, "train")}
  assert all(losses[r["step"]] == r["loss"] for r in records(broken, "train"))
  (p_whole, o_whole), (p_broken, o_broken) = (_adapters_and_opt(w, STEPS) for w in (whole, broken))
  assert set(p_whole["layers"]["attn"]) == {"q_proj", "v_proj", "o_proj"}
  jax.tree.map(np.testing.assert_array_equal, p_whole, p_broken)
  jax.tree.map(np.testing.assert_array_equal, o_whole, o_broken)


def test_a_lora_workdir_over_a_random_base_loads_merged(tmp_path):
  config = _config(mesh=(2, 2, 2))
  config.train.num_steps = 2
  config.schedule.learning_rate = 1e-2
  loop.train(config, str(tmp_path / "run"))
  record = lora_base.read(str(tmp_path / "run"))
  assert record["base"] == {"kind": "random", "seed": 0}
  loaded = loader.load_model(str(tmp_path / "run"), on_host=True)
  assert loaded.step == 2 and loaded.cfg.param_dtype == "bfloat16"
  base = jax.tree.map(
    lambda x: np.asarray(x.astype(jnp.bfloat16)), llama.init_params(loaded.cfg, seed=0)
  )
  adapters = lora_base.restore_adapters(str(tmp_path / "run" / "checkpoints" / "2" / "params"))
  want = lora.merge(base, adapters, record["spec"])
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, want
  )
  assert np.any(loaded.params["layers"]["mlp"]["up_proj"] != base["layers"]["mlp"]["up_proj"])
  np.testing.assert_array_equal(loaded.params["lm_head"], base["lm_head"])
