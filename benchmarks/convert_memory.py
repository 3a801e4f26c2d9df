"""Peak memory and time of Meta -> Orbax conversion (and Orbax -> HF export) on a ~1B model.

  python benchmarks/convert_memory.py [--workdir=/tmp/convert_bench] [--keep]
  python benchmarks/convert_memory.py --n_layers=8 --dtype=float32 --baseline   # export, ~2 GiB f32

Writes a synthetic bf16 Meta checkpoint (params.json + consolidated.00.pth, consolidated.01.pth:
2 model-parallel shards, GQA like 70B, ~1.07B parameters) with random weights, then runs the real
commands in child processes, sampling their /proc status every 50 ms:

  python -m astrollama_jax convert --source_format=meta --source=W/meta --output=W/orbax
  python -m astrollama_jax export --checkpoint=W/orbax --output=W/hf

and prints peak RSS (anonymous and file-backed separately, summed over the command's process
tree), seconds, the model size and the largest stacked parameter, which together give the memory
bound for bigger models. ``--dtype`` is convert's output dtype (what export then reads);
``--baseline`` also converts and exports a tiny model (1 layer of width 64, same vocabulary) the
same way, whose peak is the fixed cost (Python, JAX, Orbax, tensorstore) to subtract.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from astrollama_jax.perf import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(
  os.path.dirname(REPO), "shared", "data", "tokenizer", "llama2", "tokenizer.model"
)
# ~1.07B parameters: 20 layers of dim 2048, 16 heads, 8 KV heads (GQA as in 70B), ffn 5632.
PARAMS = {
  "dim": 2048,
  "n_layers": 20,
  "n_heads": 16,
  "n_kv_heads": 8,
  "multiple_of": 256,
  "ffn_dim_multiplier": None,
  "norm_eps": 1e-5,
  "vocab_size": -1,
  "rope_theta": 10000.0,
}
VOCAB = 32000


def shapes(p: dict) -> dict[str, tuple[tuple[int, ...], int | None]]:
  """Meta tensor name -> (full shape, model-parallel split axis)."""
  d, hd = p["dim"], p["dim"] // p["n_heads"]
  hidden = int(2 * 4 * d / 3)
  ffn = p["multiple_of"] * math.ceil(hidden / p["multiple_of"])
  kv = p["n_kv_heads"] * hd
  out = {
    "tok_embeddings.weight": ((VOCAB, d), 1),
    "norm.weight": ((d,), None),
    "output.weight": ((VOCAB, d), 0),
  }
  for i in range(p["n_layers"]):
    out.update(
      {
        f"layers.{i}.attention.wq.weight": ((d, d), 0),
        f"layers.{i}.attention.wk.weight": ((kv, d), 0),
        f"layers.{i}.attention.wv.weight": ((kv, d), 0),
        f"layers.{i}.attention.wo.weight": ((d, d), 1),
        f"layers.{i}.feed_forward.w1.weight": ((ffn, d), 0),
        f"layers.{i}.feed_forward.w3.weight": ((ffn, d), 0),
        f"layers.{i}.feed_forward.w2.weight": ((d, ffn), 1),
        f"layers.{i}.attention_norm.weight": ((d,), None),
        f"layers.{i}.ffn_norm.weight": ((d,), None),
      }
    )
  return out


TINY = dict(PARAMS, dim=64, n_layers=1, n_heads=4, n_kv_heads=2)


def write_meta(folder: str, mp: int = 2, params: dict | None = None) -> int:
  """Random bf16 Meta shards, one rank at a time (so writing holds one shard in memory)."""
  import torch

  params = params or PARAMS
  os.makedirs(folder, exist_ok=True)
  table = shapes(params)
  n = 0
  for rank in range(mp):
    gen = torch.Generator().manual_seed(rank)
    shard = {}
    for name, (shape, axis) in table.items():
      local = list(shape)
      if axis is not None:
        local[axis] //= mp
      shard[name] = (torch.randn(local, generator=gen) * 0.02).to(torch.bfloat16)
      n += math.prod(local) if (axis is not None or rank == 0) else 0
    shard["rope.freqs"] = torch.ones(params["dim"] // params["n_heads"] // 2)
    torch.save(shard, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
    del shard
  with open(os.path.join(folder, "params.json"), "w") as f:
    json.dump(params, f)
  shutil.copyfile(TOKENIZER, os.path.join(folder, "tokenizer.model"))
  return n


def run_measured(cmd: list[str]) -> dict:
  """Run ``cmd``; its JSON summary plus sampled peaks of RSS / anonymous / file-backed RSS.

  RSS is sampled from /proc every 50 ms and summed over the process tree: the child's own
  getrusage peak would include this (parent) process's, which it inherits at fork.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
  )
  t0 = time.time()
  with memory.TreeSampler(proc.pid) as sampler:
    out, err = proc.communicate()
  wall = time.time() - t0
  peaks = sampler.peaks
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
  summary = json.loads(out.strip().splitlines()[-1])
  return {
    **summary,
    "wall_seconds": round(wall, 1),
    "sampled_peak_rss_bytes": peaks["VmRSS"],
    "sampled_peak_anon_bytes": peaks["RssAnon"],
    "sampled_peak_file_bytes": peaks["RssFile"],
  }


def convert_and_export(
  w: str, params: dict, dtype: str | None, shard_gb: float
) -> tuple[dict, dict]:
  """Write (once) a synthetic Meta checkpoint under ``w``, convert it, export it; both measured."""
  for sub in ("orbax", "hf"):
    shutil.rmtree(os.path.join(w, sub), ignore_errors=True)
  meta = os.path.join(w, "meta")
  if not os.path.isfile(os.path.join(meta, "consolidated.01.pth")):
    shutil.rmtree(meta, ignore_errors=True)
    t0 = time.time()
    n = write_meta(meta, params=params)
    print(
      f"wrote synthetic Meta checkpoint: {n:,} parameters in {time.time() - t0:.0f}s", flush=True
    )
  py = sys.executable
  conv = run_measured(
    [
      py,
      "-m",
      "astrollama_jax",
      "convert",
      "--source_format=meta",
      f"--source={meta}",
      f"--output={w}/orbax",
      *([f"--dtype={dtype}"] if dtype else []),
    ]
  )
  exp = run_measured(
    [
      py,
      "-m",
      "astrollama_jax",
      "export",
      f"--checkpoint={w}/orbax",
      f"--output={w}/hf",
      f"--max_shard_gb={shard_gb}",
    ]
  )
  return conv, exp


def main():
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--workdir", default="/tmp/convert_bench")
  ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
  ap.add_argument("--export_shard_gb", type=float, default=2.0, help="export's --max_shard_gb")
  ap.add_argument("--n_layers", type=int, default=PARAMS["n_layers"], help="layers of the model")
  ap.add_argument("--dtype", default=None, help="convert's --dtype (default: bf16 as stored)")
  ap.add_argument("--baseline", action="store_true", help="also measure a tiny model the same way")
  args = ap.parse_args()
  w = args.workdir
  params = dict(PARAMS, n_layers=args.n_layers)
  conv, exp = convert_and_export(os.path.join(w, "model"), params, args.dtype, args.export_shard_gb)
  d, ffn = params["dim"], 5632
  itemsize = 4 if args.dtype == "float32" else 2
  largest = params["n_layers"] * d * ffn * itemsize  # a stacked MLP matrix
  result = {
    "parameters": conv["parameters"],
    "model_bytes": conv["bytes"],
    "largest_param_bytes": largest,
    "largest_hf_tensor_bytes": VOCAB * d * itemsize,  # embed / lm_head
    "meta_shard_bytes": sum(
      os.path.getsize(os.path.join(w, "model", "meta", f))
      for f in os.listdir(os.path.join(w, "model", "meta"))
      if f.endswith(".pth")
    ),
    "convert_seconds": conv["seconds"],
    "convert_wall_seconds": conv["wall_seconds"],
    "convert_peak_rss_bytes": conv["sampled_peak_rss_bytes"],
    "convert_peak_anon_bytes": conv["sampled_peak_anon_bytes"],
    "convert_peak_file_bytes": conv["sampled_peak_file_bytes"],
    "export_shard_gb": args.export_shard_gb,
    "export_seconds": exp["seconds"],
    "export_wall_seconds": exp["wall_seconds"],
    "export_peak_rss_bytes": exp["sampled_peak_rss_bytes"],
    "export_peak_anon_bytes": exp["sampled_peak_anon_bytes"],
    "export_peak_file_bytes": exp["sampled_peak_file_bytes"],
  }
  if args.baseline:
    tconv, texp = convert_and_export(
      os.path.join(w, "tiny"), TINY, args.dtype, args.export_shard_gb
    )
    peak = "sampled_peak_rss_bytes"
    result.update(
      tiny_model_bytes=tconv["bytes"],
      tiny_convert_peak_rss_bytes=tconv[peak],
      tiny_export_peak_rss_bytes=texp[peak],
      export_above_tiny_bytes=exp[peak] - texp[peak],
      convert_above_tiny_bytes=conv[peak] - tconv[peak],
    )
  width = max(map(len, result))
  for k, v in result.items():
    print(
      f"{k:<{width}}  {v / 1024**3:8.2f} GiB" if k.endswith("bytes") else f"{k:<{width}}  {v:,}"
    )
  print(f"machine: {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
  print(json.dumps(result))
  if not args.keep:
    shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
  main()
