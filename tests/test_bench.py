"""The bench command at a tiny size on CPU: it runs, prints its JSON, and its numbers add up.

No timing is asserted (CPU times mean nothing); what is checked is the arithmetic that turns a
measured step time into tokens/s, TFLOP/s per device and MFU, against ``astrollama_jax.perf.flops``,
and that the PyTorch reference computes as the config says (dtypes, fused AdamW, remat), with no
ratio printed where it cannot.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from astrollama_jax.model.config import get_config
from astrollama_jax.perf import bench, bench_jax, bench_torch, flops, timing

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_bench(*flag_args: str, tmp_path) -> tuple[dict, str, list[str]]:
  """Run ``python -m astrollama_jax bench`` on one CPU device: (last JSON line, stdout,
  --output lines)."""
  out_file = tmp_path / "bench.jsonl"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
  )
  cmd = [
    sys.executable,
    "-m",
    "astrollama_jax",
    "bench",
    "--config=configs/bench.py:tiny",
    "--config.mesh=(1,1,1)",
    "--steps=2",
    "--warmup=1",
    "--reference=torch",
    f"--output={out_file}",
    *flag_args,
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  return json.loads(last), proc.stdout, out_file.read_text().splitlines()


def test_train_json_adds_up(tmp_path):
  s, stdout, written = _run_bench(
    "--task=train",
    "--config.data.seq_len=64",
    "--config.train.global_batch_size=4",
    "--config.train.grad_accum_steps=2",
    "--config.loss.chunk_size=32",
    "--config.model.remat_policy=full",
    "--xla_flags=latency_hiding",
    "--peak_tflops=2",
    tmp_path=tmp_path,
  )
  assert json.loads(written[-1]) == s
  assert "jax / torch tokens/s" in stdout
  # The flags reached XLA (an unknown flag would have aborted the process) and the JSON says so.
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in s["xla_flags"]
  assert (s["task"], s["batch"], s["seq"], s["micro_batches"], s["ce_chunk"]) == (
    "train",
    4,
    64,
    2,
    32,
  )
  assert not s["bf16_moments"] and s["remat"] == "full" and s["n_devices"] == 1
  # like for like: float32 master weights, bf16 autocast, fused AdamW (torch has it on CPU)
  ref = s["reference"]
  assert (ref["param_dtype"], ref["compute_dtype"], ref["autocast"]) == (
    "float32",
    "bfloat16",
    "bfloat16",
  )
  assert ref["fused_adamw"] and ref["moments_dtype"] == "float32" and ref["remat"] == "full"
  assert s["computes"]["compute_dtype"] == "bfloat16" and s["reference_mismatches"] == []
  assert "params float32, compute bfloat16 (autocast)" in stdout

  cfg = get_config("tiny")
  assert s["flops_per_step"] == pytest.approx(flops.training_flops(cfg, 4, 64).total, rel=1e-12)
  assert s["tokens_per_step"] == 4 * 64
  for side, n_dev in ((s, s["n_devices"]), (s["reference"], 1)):
    t = side["step_time_s"]
    assert side["step_time_min_s"] <= t <= side["step_time_max_s"]
    assert side["tokens_per_s"] == pytest.approx(256 / t, rel=1e-9)
    assert side["tflops_per_device"] == pytest.approx(
      s["flops_per_step"] / t / n_dev / 1e12, rel=1e-9
    )
    assert side["mfu"] == pytest.approx(side["tflops_per_device"] / 2.0, rel=1e-9)
    assert side["peak_memory_gb"] is None  # CPU keeps no allocator statistics
  assert s["speedup_vs_reference"] == pytest.approx(
    s["tokens_per_s"] / s["reference"]["tokens_per_s"], rel=1e-9
  )
  # The step really trained: a random init starts at about ln(vocab).
  assert abs(s["final_loss"] - math.log(cfg.vocab_size)) < 0.5
  assert s["compiled_memory_gb"] > 0 and s["timed_steps"] == 2
  assert s["reference"]["impl"] == "torch" and s["reference"]["gradient_checkpointing"]
  assert s["versions"]["jax"] == jax.__version__ and "torch" in s["versions"]


def test_decode_json_adds_up_and_tokens_match_the_reference(tmp_path):
  """In float32 both sides decode the same weights to the same greedy tokens."""
  s, stdout, _ = _run_bench(
    "--task=decode",
    "--config.train.global_batch_size=2",
    "--config.model.compute_dtype=float32",
    "--prompt_len=12",
    "--new_tokens=6",
    tmp_path=tmp_path,
  )
  assert s["reference"]["param_dtype"] == s["computes"]["param_dtype"] == "float32"
  assert s["reference_mismatches"] == []
  assert s["tokens_identical"] and s["rows_identical"] == 2
  assert s["common_prefix_fraction"] == 1.0 and "same greedy tokens    yes" in stdout
  assert (s["task"], s["batch"], s["prompt_len"], s["new_tokens"]) == ("decode", 2, 12, 6)
  for side in (s, s["reference"]):
    assert side["tokens_per_s"] == pytest.approx(2 * 6 / side["time_s"], rel=1e-9)
    assert 0 < side["prefill_s"]
  assert s["speedup_vs_reference"] == pytest.approx(
    s["tokens_per_s"] / s["reference"]["tokens_per_s"], rel=1e-9
  )
  assert "decode_tokens_per_s" in stdout


def test_rates_and_decode_rates():
  r = timing.rates(
    flops_per_step=8e12, tokens_per_step=4096, step_s=2.0, n_devices=2, peak_flops=4e12
  )
  assert r == pytest.approx({"tokens_per_s": 2048.0, "tflops_per_device": 2.0, "mfu": 0.5})
  assert timing.rates(8e12, 4096, 2.0, 2, None)["mfu"] is None
  d = timing.decode_rates(full_s=3.0, first_s=0.5, batch=4, new_tokens=11)
  assert d["tokens_per_s"] == pytest.approx(44 / 3.0)
  assert d["decode_tokens_per_s"] == pytest.approx(40 / 2.5)


def _config(moments: str = "float32", **model):
  """(training config, model config): only the keys the settings read."""
  from ml_collections import config_dict

  config = config_dict.ConfigDict({"optimizer": {"moments_dtype": moments}})
  return config, get_config("tiny", **model)


@pytest.mark.parametrize(
  "param, compute, remat, autocast",
  [
    ("float32", "bfloat16", "full", "bfloat16"),
    ("float32", "float32", "none", None),
    ("bfloat16", "bfloat16", "full", None),
  ],
)
def test_reference_settings_follow_the_config(param, compute, remat, autocast):
  moments = "bfloat16" if param == "bfloat16" else "float32"  # torch: the weights' dtype
  config, cfg = _config(moments, param_dtype=param, compute_dtype=compute, remat_policy=remat)
  ours = bench_jax.jax_settings("train", config, cfg)
  ref = bench_torch.reference_settings("train", cfg, fused_adamw=True)
  assert (ref["param_dtype"], ref["compute_dtype"], ref["autocast"]) == (param, compute, autocast)
  assert ref["moments_dtype"] == moments and ref["remat"] == remat
  assert ref["gradient_checkpointing"] == (remat != "none")
  assert bench_torch.mismatches(ours, ref) == []
  # decoding: weights in the compute dtype on both sides
  dec = bench_torch.reference_settings("decode", cfg, fused_adamw=False)
  assert dec["param_dtype"] == dec["compute_dtype"] == compute and dec["autocast"] is None
  assert bench_torch.mismatches(bench_jax.jax_settings("decode", config, cfg), dec) == []


def test_a_handicapped_reference_gets_no_ratio():
  config, cfg = _config(moments="bfloat16", remat_policy="dots")
  ours = bench_jax.jax_settings("train", config, cfg)
  ref = bench_torch.reference_settings("train", cfg, fused_adamw=False)
  found = bench_torch.mismatches(ours, ref)
  assert found == [
    "moments_dtype: jax bfloat16, torch float32",
    "remat: jax dots, torch full (per layer)",
    "optimizer: torch has no fused AdamW on this device",
  ]
  summary = {"device": "cpu", "computes": ours, "tokens_per_s": 100.0}
  bench.attach_reference(summary, {**ref, "tokens_per_s": 10.0})
  assert "speedup_vs_reference" not in summary and summary["reference_mismatches"] == found
  like = {"device": "cpu", "computes": ours, "tokens_per_s": 100.0}
  bench.attach_reference(like, {**ref, **ours, "fused_adamw": True, "tokens_per_s": 10.0})
  assert like["speedup_vs_reference"] == pytest.approx(10.0) and like["reference_mismatches"] == []


def test_fused_adamw_on_cpu_and_token_agreement():
  assert bench_torch.fused_adamw_available("cpu")  # torch >= 2.4 has a fused CPU AdamW
  a = bench.token_agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 5, 6]])
  assert a == {"tokens_identical": False, "rows_identical": 1, "common_prefix_fraction": 5 / 6}
  assert bench.token_agreement([[1]], [[1]])["tokens_identical"]


def test_synthetic_batch_is_a_pipeline_batch():
  b = bench_jax.synthetic_batch(vocab=100, batch=3, seq=8, seed=0)
  assert {k: v.shape for k, v in b.items()} == {
    k: (3, 8) for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")
  }
  assert (b["tokens"][:, 1:] == b["targets"][:, :-1]).all()
  assert b["tokens"].min() >= 3 and b["tokens"].max() < 100


def test_xla_flags_errors():
  with pytest.raises(Exception, match="unknown --xla_flags preset 'fast'"):
    bench_jax.configure_xla("fast")
  jax.devices()  # the test process has a backend now: flags could no longer take effect
  with pytest.raises(RuntimeError, match="before JAX initialises a backend"):
    bench_jax.configure_xla("latency_hiding")
  assert bench_jax.configure_xla("none") == ""


def test_out_of_memory_is_a_result_other_errors_raise():
  def oom():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")

  assert bench.guarded(oom, "jax")["error"] == "out of memory"
  with pytest.raises(ValueError):
    bench.guarded(lambda: (_ for _ in ()).throw(ValueError("bad shape")), "jax")


def test_reference_runs_before_jax_claims_the_device():
  """On a GPU, JAX's backend takes its memory when it starts: the torch side must not start it."""
  script = (
    "import contextlib, io, json, sys\n"
    "from absl import flags\n"
    "from astrollama_jax.commands import bench\n"
    "from astrollama_jax.perf import bench_jax\n"
    "bench.define_flags()\n"
    # config_flags reads its --config.* overrides from sys.argv
    "sys.argv = ['bench', '--task=train', '--config=configs/bench.py:tiny',\n"
    "            '--config.model.n_layers=1', '--config.data.seq_len=16',\n"
    "            '--config.train.global_batch_size=1', '--steps=1', '--warmup=0',\n"
    "            '--reference=torch_only']\n"
    "flags.FLAGS(sys.argv)\n"
    "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
    "  bench.main(['bench'])\n"
    "s = json.loads(out.getvalue().splitlines()[-1])\n"
    "print(json.dumps([bench_jax.backends_initialized(), s['reference']['step_time_s'] > 0,\n"
    "                  s.get('step_time_s')]))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, True, None]
