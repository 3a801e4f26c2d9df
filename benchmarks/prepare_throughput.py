r"""Papers per second and peak memory of ``prepare`` on a synthetic arXiv bulk, and a projection.

  python benchmarks/prepare_throughput.py --latex=../shared/data/latex --papers=5000

Builds ``--tars`` monthly bulk tars in arXiv's layout (``arXiv_src_YYMM_001.tar`` holding
``YYMM/ID.gz``) from the real papers in ``--latex``, cycling through them: every other paper
a gzipped tar (its .tex files plus an incompressible ``--figure_kb`` figure), the others a
gzipped single .tex, and one entry in ``--pdf_every`` a PDF-only entry. Then runs the real
command, ``python -m astrollama_jax prepare``, as a subprocess: with ``--workers=1`` on the
first quarter, half and all of the tars (memory against corpus size), and with
``--workers=2`` on all of them. Peak memory is the largest sum of VmRSS over the command's
process tree (the command and its worker processes), sampled from /proc every 50 ms. The
parse phase ends when the last tar's result file appears in the work folder; the rest (metadata
join, TFDS write, manifest, indexes) is the write phase. CPU time is summed over the tree too
(utime + stime from /proc), per phase and apart for the command and its workers. The projection
for an archive of ``--archive_papers`` papers on a ``--cores`` host uses CPU seconds per paper,
which do not depend on how busy the measuring machine is: the workers' parse work divides over the
cores, the command's own per-paper work while parsing and the write phase stay serial.
``--baseline=CHECKOUT`` also runs another checkout's ``prepare`` on the same bulk, each run
right after this tree's, ``--rounds`` times, and reports medians of both and their ratio: a
before/after comparison paired against the machine's load. Prints a table and one JSON line.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import os
from pathlib import Path
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app, flags
import numpy as np

from astrollama_jax.perf import memory

FLAGS = flags.FLAGS
flags.DEFINE_string("latex", "../shared/data/latex", "Folder of paper folders (.tex files).")
flags.DEFINE_integer("papers", 5000, "Entries in the synthetic bulk.")
flags.DEFINE_integer("tars", 8, "Monthly tars the entries are spread over.")
flags.DEFINE_integer("figure_kb", 256, "Size of the figure in each gzipped-tar member, KiB.")
flags.DEFINE_integer("pdf_every", 25, "One entry in this many is PDF only.")
flags.DEFINE_integer("archive_papers", 330_000, "Papers in the archive to project for.")
flags.DEFINE_integer("cores", 16, "Cores of the host to project for.")
flags.DEFINE_string("work", None, "Folder for the bulk and outputs (default: a temporary one).")
flags.DEFINE_list(
  "runs",
  ["0.25:1", "0.5:1", "1:1", "1:2"],
  "Runs as FRACTION_OF_TARS:WORKERS (the projection needs 1:1 and 1:2).",
)
flags.DEFINE_string("baseline", None, "Another checkout to run paired with this one.")
flags.DEFINE_integer("rounds", 1, "Rounds of the runs (medians reported).")

REPO = Path(__file__).resolve().parents[1]


def _tar(files: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 0
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def make_bulk(
  latex: Path, out: Path, papers: int, tars: int, figure_kb: int, pdf_every: int
) -> dict:
  """The synthetic bulk; returns its shape (entries per kind, bytes on disk)."""
  folders = sorted(p for p in latex.iterdir() if p.is_dir() and list(p.glob("*.tex")))
  rng = np.random.default_rng(0)
  out.mkdir(parents=True)
  kinds = {"gzipped_tar": 0, "single_file": 0, "pdf_only": 0}
  per_tar = -(-papers // tars)
  for t in range(tars):
    yymm = f"{21 + t // 12:02d}{t % 12 + 1:02d}"
    with tarfile.open(out / f"arXiv_src_{yymm}_001.tar", "w") as bulk:
      for i in range(t * per_tar, min(papers, (t + 1) * per_tar)):
        folder = folders[i % len(folders)]
        texs = {
          p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.tex"))
        }
        pid = f"{yymm}.{i:05d}"
        if pdf_every and i % pdf_every == pdf_every - 1:
          name, data, kind = f"{yymm}/{pid}.pdf", b"%PDF-1.5\n" + rng.bytes(20_000), "pdf_only"
        elif i % 2 == 0 or len(texs) > 1:
          fig = {"figures/fig1.png": rng.bytes(figure_kb << 10)}
          name, data, kind = (
            f"{yymm}/{pid}.gz",
            gzip.compress(_tar(texs | fig), 6, mtime=0),
            "gzipped_tar",
          )
        else:
          name, data, kind = (
            f"{yymm}/{pid}.gz",
            gzip.compress(texs["ms.tex"], 6, mtime=0),
            "single_file",
          )
        kinds[kind] += 1
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0
        bulk.addfile(info, io.BytesIO(data))
  size = sum(p.stat().st_size for p in out.iterdir())
  return {"entries": kinds, "tars": tars, "bytes": size}


def _split_cpu(cpu: dict[int, float], main: int) -> tuple[float, float]:
  return cpu.get(main, 0.0), sum(v for k, v in cpu.items() if k != main)


def run_prepare(sources: list[Path], out: Path, workers: int, repo: Path = REPO) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "astrollama_jax",
    "prepare",
    "--source=" + ",".join(map(str, sources)),
    f"--output={out}",
    f"--workers={workers}",
    "--validation_fraction=0.05",
  ]
  env = dict(os.environ, PYTHONPATH=str(repo))
  start = time.perf_counter()
  proc = subprocess.Popen(
    cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
  )
  parse_start, parse_end = None, None
  work = out / ".astro_corpus-work"
  marks: dict[str, tuple[float, float]] = {}  # (command, workers) CPU seconds at phase changes

  def phases(sampler: memory.TreeSampler) -> None:
    nonlocal parse_start, parse_end
    if parse_start is None and work.exists():
      parse_start = time.perf_counter()
      marks["start"] = _split_cpu(sampler.cpu, proc.pid)
    if parse_end is None and work.exists() and len(list(work.glob("*.jsonl.gz"))) == len(sources):
      parse_end = time.perf_counter()
      marks["end"] = _split_cpu(sampler.cpu, proc.pid)

  with memory.TreeSampler(proc.pid, on_sample=phases) as sampler:
    stdout, _ = proc.communicate()
  total = time.perf_counter() - start
  cpu, peak = sampler.cpu, sampler.peak_rss_bytes
  if proc.returncode:
    raise RuntimeError(f"prepare failed ({proc.returncode}): {stdout[-2000:]}")
  summary = json.loads(stdout.strip().splitlines()[-1])
  parse_end = parse_end or start + total
  parse_start = parse_start or start
  papers = summary["papers_seen"]
  begin, end = marks.get("start", (0.0, 0.0)), marks.get("end", _split_cpu(cpu, proc.pid))
  return {
    "workers": workers,
    "tars": len(sources),
    "papers": summary["papers_seen"],
    "kept": summary["papers_kept"],
    "retention": summary["retention"],
    "seconds": total,
    "startup_seconds": parse_start - start,
    "parse_seconds": parse_end - parse_start,
    "write_seconds": start + total - parse_end,
    "papers_per_s": summary["papers_seen"] / total,
    "parse_papers_per_s": summary["papers_seen"] / max(parse_end - parse_start, 1e-9),
    "peak_rss_bytes": peak,
    "cpu_seconds": sum(cpu.values()),
    # CPU seconds per paper while parsing, in the command itself and in its workers (with
    # --workers=0 the command does it all), and after parsing (serial): load-independent
    "parse_cpu_main_per_paper": (end[0] - begin[0]) / papers,
    "parse_cpu_workers_per_paper": (end[1] - begin[1]) / papers,
    "write_cpu_per_paper": (sum(_split_cpu(cpu, proc.pid)) - sum(end)) / papers,
    "records": sum(sum(v.values()) for v in summary["records"].values()),
  }


def _rounded(value):
  if isinstance(value, float):
    return float(f"{value:.4g}")
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_rounded(v) for v in value]
  return value


# compared with the baseline (ratios this / baseline): CPU per paper is load-independent
_COMPARED = (
  "parse_cpu_workers_per_paper",
  "parse_cpu_main_per_paper",
  "write_cpu_per_paper",
  "parse_seconds",
  "write_seconds",
  "seconds",
)


def _median_run(rounds: list[dict]) -> dict:
  """One run's figures, each the median over the rounds (counts are the same in every round)."""
  import statistics

  out = dict(rounds[0])
  for k, v in out.items():
    if isinstance(v, float):
      out[k] = statistics.median(r[k] for r in rounds)
  out["peak_rss_bytes"] = int(statistics.median(r["peak_rss_bytes"] for r in rounds))
  return out


def main(argv: list[str]) -> None:
  del argv
  root = Path(FLAGS.work or tempfile.mkdtemp(prefix="prepare_bench"))
  bulk = root / "bulk"
  shutil.rmtree(bulk, ignore_errors=True)
  shape = make_bulk(
    Path(FLAGS.latex), bulk, FLAGS.papers, FLAGS.tars, FLAGS.figure_kb, FLAGS.pdf_every
  )
  tars = sorted(bulk.glob("*.tar"))
  plan = []
  for spec in FLAGS.runs:
    fraction, workers = spec.split(":")
    plan.append((max(1, round(len(tars) * float(fraction))), int(workers)))
  trees = {"this": REPO} | ({"baseline": Path(FLAGS.baseline).resolve()} if FLAGS.baseline else {})
  measured: dict[str, list[list[dict]]] = {name: [[] for _ in plan] for name in trees}
  for _ in range(FLAGS.rounds):
    for i, (n_tars, workers) in enumerate(plan):
      for name, repo in trees.items():
        out = root / f"out_{name}_{n_tars}_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        measured[name][i].append(run_prepare(tars[:n_tars], out, workers, repo))
        shutil.rmtree(out, ignore_errors=True)
  runs = [_median_run(r) for r in measured["this"]]
  by_plan = dict(zip(plan, runs))
  projection = None
  full1, full2 = by_plan.get((len(tars), 1)), by_plan.get((len(tars), 2))
  n, cores = FLAGS.archive_papers, FLAGS.cores
  if full1 and full2:
    # Projection from CPU time (the shared 2-core box's wall times depend on its load): the
    # workers' parse work divides over the cores, the command's own share per paper (reading
    # tars, writing results) and the write phase are serial.
    worker_cpu = full2["parse_cpu_workers_per_paper"]
    main_cpu = full2["parse_cpu_main_per_paper"]
    parse_h = n * max(worker_cpu / cores, main_cpu) / 3600
    write_h = n * full1["write_cpu_per_paper"] / 3600
    projection = {
      "archive_papers": n,
      "cores": cores,
      "hours": round(parse_h + write_h, 2),
      "parse_hours": round(parse_h, 2),
      "write_hours": round(write_h, 2),
      "papers_per_s": round(n / ((parse_h + write_h) * 3600), 1),
      "wall_parallel_efficiency_1_to_2": round(
        full1["parse_seconds"] / (2 * full2["parse_seconds"]), 3
      ),
    }
  baseline = None
  if FLAGS.baseline:
    baseline = [_median_run(r) for r in measured["baseline"]]
    for ours, theirs in zip(runs, baseline):
      ours["vs_baseline"] = {
        k: round(ours[k] / theirs[k], 3) if theirs[k] else None for k in _COMPARED
      }
  result = {
    "benchmark": "prepare_throughput",
    "bulk": shape,
    "rounds": FLAGS.rounds,
    "runs": runs,
    "baseline": FLAGS.baseline and {"checkout": FLAGS.baseline, "runs": baseline},
    "projection": projection,
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "versions": {
      "python": platform.python_version(),
      **{
        p: importlib.metadata.version(p) for p in ("tensorflow-datasets", "array-record", "numpy")
      },
    },
  }
  print(
    f"{'workers':>7} {'tars':>4} {'papers':>6} {'kept':>6} {'seconds':>8} {'start s':>8} "
    f"{'parse s':>8} {'write s':>8} {'papers/s':>8} {'peak RSS MiB':>12}"
  )
  for r in runs:
    print(
      f"{r['workers']:>7} {r['tars']:>4} {r['papers']:>6} {r['kept']:>6} {r['seconds']:>8.1f} "
      f"{r['startup_seconds']:>8.1f} {r['parse_seconds']:>8.1f} {r['write_seconds']:>8.1f} "
      f"{r['papers_per_s']:>8.1f} {r['parse_papers_per_s']:>8.1f} "
      f"{r['peak_rss_bytes'] / 2**20:>12.0f}"
    )
  for r in runs:
    if "vs_baseline" in r:
      print(
        f"workers {r['workers']}, {r['tars']} tars, against the baseline: "
        + ", ".join(f"{k} x{v}" for k, v in r["vs_baseline"].items())
      )
  p = result["projection"]
  if p:
    print(
      f"projection: {n:,} papers on {cores} cores: {p['hours']} h = {p['papers_per_s']} "
      f"papers/s (parse {p['parse_hours']} h, write {p['write_hours']} h)"
    )
  print(json.dumps(_rounded(result)))
  if not FLAGS.work:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
