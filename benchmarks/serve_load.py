r"""Load test of ``python -m astrollama_jax serve``: requests/s and latency at 1, 8 and 32 clients.

  python benchmarks/serve_load.py --preset=tiny_gqa \
      --tokenizer=../shared/data/tokenizer/llama2/tokenizer.model
  python benchmarks/serve_load.py --checkpoint=hf/astrollama-7b-chat      # a real model
  python benchmarks/serve_load.py --url=http://127.0.0.1:8000 --model=NAME  # a running server

Starts the server (unless ``--url``) on a free loopback port, from ``--checkpoint`` or from a
random ``--preset`` model written to a temporary folder, and waits for it. Then, for each client
count, after one untimed request per client (compiles, connections), the clients (threads, one
keep-alive connection each) send greedy chat completions of exactly ``--max_tokens`` answer
tokens in a closed loop until ``--requests`` are done or ``--max_seconds`` have passed. Latency
is request to last byte, measured by the client. Prints a table and one JSON line.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

from absl import app, flags, logging
import numpy as np

from astrollama_jax.util import tables

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "A running server (else one is started here).")
flags.DEFINE_string("model", None, "Model id on --url (default: the first of /v1/models).")
flags.DEFINE_string("checkpoint", None, "Checkpoint the started server loads.")
flags.DEFINE_string("preset", "tiny_gqa", "Without --checkpoint: a random model of this preset.")
flags.DEFINE_string(
  "tokenizer",
  "../shared/data/tokenizer/llama2/tokenizer.model",
  "tokenizer.model for a --preset model.",
)
flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent client counts, one run each.")
flags.DEFINE_integer("requests", 64, "Requests per run (bounded).")
flags.DEFINE_float("max_seconds", 120, "Time limit per run.")
flags.DEFINE_integer("max_tokens", 32, "Answer tokens per request.")
flags.DEFINE_integer("max_batch", 8, "--max_batch of the started server.")
flags.DEFINE_multi_string("server_flag", [], "Extra flag for the started server (repeatable).")

QUESTIONS = [
  "What is a quasar?",
  "Why is the night sky dark?",
  "What is a blazar?",
  "How old is the Universe?",
  "What is dark matter?",
  "Define a parsec.",
  "What powers the Sun?",
  "What is redshift?",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _random_checkpoint(folder: str) -> str:
  """A random ``--preset`` model saved as a converted checkpoint (what the server loads)."""
  from astrollama_jax.checkpoints import writer
  from astrollama_jax.model import llama
  from astrollama_jax.model.config import get_config

  cfg = get_config(FLAGS.preset, compute_dtype="float32")
  params = llama.init_params(cfg, seed=0)
  return writer.save_params(os.path.join(folder, FLAGS.preset), cfg, params, FLAGS.tokenizer)


def _request(conn: http.client.HTTPConnection, model: str, question: str) -> tuple[int, int]:
  body = {
    "model": model,
    "messages": [{"role": "user", "content": question}],
    "temperature": 0,
    "max_tokens": FLAGS.max_tokens,
  }
  conn.request(
    "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
  )
  r = conn.getresponse()
  data = json.loads(r.read())
  return r.status, (data.get("usage") or {}).get("completion_tokens", 0)


def run_level(host: str, port: int, model: str, clients: int) -> dict:
  """One closed-loop run with ``clients`` threads; latency percentiles over the finished ones."""
  lock = threading.Lock()
  left = [FLAGS.requests]
  latencies: list[float] = []
  statuses: dict[str, int] = {}
  tokens = [0]
  warm = threading.Barrier(clients + 1)
  go = threading.Event()
  deadline = [0.0]

  def client(i: int) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    _request(conn, model, QUESTIONS[i % len(QUESTIONS)])  # untimed: compile, connect
    warm.wait()
    go.wait()
    k = 0
    while True:
      with lock:
        if left[0] <= 0 or time.perf_counter() > deadline[0]:
          break
        left[0] -= 1
      start = time.perf_counter()
      status, n = _request(conn, model, QUESTIONS[(i + k) % len(QUESTIONS)])
      elapsed = time.perf_counter() - start
      k += 1
      with lock:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status == 200:
          latencies.append(elapsed)
          tokens[0] += n
    conn.close()

  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  warm.wait()
  start = time.perf_counter()
  deadline[0] = start + FLAGS.max_seconds
  go.set()
  for t in threads:
    t.join()
  seconds = time.perf_counter() - start
  lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
  return {
    "clients": clients,
    "requests": len(latencies),
    "statuses": statuses,
    "seconds": round(seconds, 3),
    "requests_per_s": round(len(latencies) / seconds, 3),
    "tokens_per_s": round(tokens[0] / seconds, 1),
    "p50_s": round(float(np.percentile(lat, 50)), 4),
    "p95_s": round(float(np.percentile(lat, 95)), 4),
  }


def _versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def main(argv) -> None:
  del argv

  proc, tmp = None, None
  if FLAGS.url:
    url = urllib.parse.urlsplit(FLAGS.url)
    host, port = url.hostname, url.port or 80
  else:
    tmp = tempfile.TemporaryDirectory()
    checkpoint = FLAGS.checkpoint or _random_checkpoint(tmp.name)
    host, port = "127.0.0.1", _free_port()
    cmd = [
      sys.executable,
      "-m",
      "astrollama_jax",
      "serve",
      f"--checkpoint={checkpoint}",
      f"--port={port}",
      f"--max_batch={FLAGS.max_batch}",
      "--max_queue=256",
      "--model_name=bench",
      *FLAGS.server_flag,
    ]
    proc = subprocess.Popen(
      cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp.name, "server.log"), "wb")
    )
  try:
    model = FLAGS.model
    end = time.time() + 600
    while True:
      try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        listed = json.loads(r.read())
        model = model or listed["data"][0]["id"]
        break
      except (OSError, KeyError, ValueError):
        if time.time() > end or (proc is not None and proc.poll() is not None):
          raise SystemExit("the server did not come up") from None
        time.sleep(1)
    import jax

    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}" if proc else "remote"
    rows = []
    for clients in (int(c) for c in FLAGS.clients):
      row = run_level(host, port, model, clients)
      logging.info("%s", row)
      rows.append(row)
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=60)
    if tmp is not None:
      tmp.cleanup()
  summary = {
    "benchmark": "serve_load",
    "model": FLAGS.checkpoint or f"random {FLAGS.preset}",
    "device": device,
    "max_tokens": FLAGS.max_tokens,
    "max_batch": FLAGS.max_batch,
    "requests_per_level": FLAGS.requests,
    "max_seconds": FLAGS.max_seconds,
    **_versions(),
    "levels": rows,
  }
  tables.report(
    "serve load",
    summary,
    rows,
    [
      "clients",
      "requests",
      "seconds",
      "requests_per_s",
      "tokens_per_s",
      "p50_s",
      "p95_s",
      "statuses",
    ],
  )


if __name__ == "__main__":
  app.run(main)
