"""Shared helpers of the test suite: the real data, training runs in subprocesses, kill and
resume, the eval command in-process, torch references, Meta checkpoints, free ports, a model
server in this process."""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import os
import pathlib
from pathlib import Path
import random
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request

from absl import flags
import numpy as np
import pytest

from astrollama_jax import sharding
from astrollama_jax.checkpoints import loader
from astrollama_jax.data.chat_template import write_hf_tokenizer_files
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.generation import generate
from astrollama_jax.serve.batching import Batcher
from astrollama_jax.serve.server import App, Server

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELLED_LATEX = SHARED_DATA / "latex"
ABSTRACTS = SHARED_DATA / "arxiv-astro-ph" / "abstracts.jsonl"
TOKENIZER = SHARED_DATA / "tokenizer" / "llama2" / "tokenizer.model"
DEMO_CORPUS = REPO / "data" / "demo_corpus"


def need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"shared data not present: {path}")
  return path


def abstracts_subset(tmp_dir: Path, n: int = 300) -> Path:
  """The first ``n`` lines of the shared abstracts.jsonl, as a file of its own."""
  src = need(ABSTRACTS)
  out = tmp_dir / "abstracts_subset.jsonl"
  with open(src, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
    g.writelines(itertools.islice(f, n))
  return out


def write_tar_gz(path: Path, files: dict[str, str]) -> Path:
  with tarfile.open(path, "w:gz") as tar:
    for name, text in sorted(files.items()):
      data = text.encode("utf-8")
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = 0
      tar.addfile(info, io.BytesIO(data))
  return path


def write_gz(path: Path, text: str | bytes) -> Path:
  data = text.encode("utf-8") if isinstance(text, str) else text
  with open(path, "wb") as f:
    f.write(gzip.compress(data, mtime=0))
  return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


MINI_PAPER = r"""\documentclass{aastex631}
\newcommand{\msun}{M_\odot}
\begin{document}
\title{A Tiny Test Paper}
\begin{abstract}
We study \emph{tiny} galaxies of $10^{9}\,\msun$ \citep{a,b}. % a comment
They are small.
\end{abstract}
\section{Introduction}\label{sec:intro}
Galaxies are \textbf{big} (see Section~\ref{sec:c}).
\begin{figure}\caption{Not text.}\end{figure}
Some are small.
\input{body}
\section*{Summary and Conclusions}
We conclude that small galaxies exist.
\begin{equation} E = mc^2 \label{eq:e} \end{equation}
\acknowledgments We thank nobody.
\bibliography{refs}
\end{document}
"""
MINI_BODY = r"""\section{Methods}
We looked at them.
"""


# --- training runs in subprocesses ------------------------------------------------------

# A model small enough for seconds per run, with the real 32,000-piece vocabulary.
TINY_MODEL = [
  "--config.model.dim=64",
  "--config.model.n_layers=2",
  "--config.model.n_heads=4",
  "--config.model.n_kv_heads=2",
  "--config.model.ffn_dim=128",
]


def train_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  return env


def train_cmd(workdir, *overrides: str, config: str = "configs/demo.py") -> list[str]:
  return [
    sys.executable,
    "-m",
    "astrollama_jax",
    "train",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def start(cmd: list[str], devices: int, log_path) -> subprocess.Popen:
  log = open(log_path, "ab")
  return subprocess.Popen(
    cmd, cwd=REPO, env=train_env(devices), stdout=log, stderr=subprocess.STDOUT
  )


def finish(
  proc: subprocess.Popen, log_path, timeout: float = 240, summary: bool = True, rc: int = 0
) -> dict:
  """Wait for a run; return its JSON summary (the last stdout line), or fail with its log.

  Only process 0 prints a summary: pass ``summary=False`` for the others. ``rc``: the exit
  status expected (``exit_codes``: 75 after a preemption).
  """
  try:
    got = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"training timed out; log tail:\n{tail(log_path)}") from None
  if got != rc:
    raise AssertionError(f"training exited {got}, not {rc}; log tail:\n{tail(log_path)}")
  if not summary:
    return {}
  for line in reversed(pathlib.Path(log_path).read_text(errors="replace").splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise AssertionError(f"no JSON summary; log tail:\n{tail(log_path)}")


def tail(path, n: int = 4000) -> str:
  return pathlib.Path(path).read_text(errors="replace")[-n:]


def records(workdir, kind: str) -> list[dict]:
  from astrollama_jax.train.metrics import read_jsonl

  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [r for r in read_jsonl(str(path)) if r["kind"] == kind] if path.exists() else []


SYNTHETIC = [
  *TINY_MODEL,
  "--config.model.vocab_size=1024",
  "--config.data.kind=synthetic",
  "--config.data.synthetic.num_rows=64",
  "--config.data.seq_len=32",
  "--config.train.global_batch_size=4",
  "--config.log.every=1",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=False",
  "--config.checkpoint.every=3",
  "--config.checkpoint.keep=5",
]


# --- kill -9 and resume -------------------------------------------------------------------

STEPS, EVERY = 9, 3
# A tiny LM run that checkpoints every EVERY steps and logs every batch's digest.
RESUME_RUN = [
  *TINY_MODEL,
  "--config.data.seq_len=64",
  "--config.train.global_batch_size=4",
  f"--config.train.num_steps={STEPS}",
  f"--config.checkpoint.every={EVERY}",
  "--config.checkpoint.keep=10",
  "--config.log.every=1",
  "--config.log.batch_hashes=True",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=False",
  "--config.loss.chunk_size=0",
]


def wait_for(cond, proc, timeout=180.0):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before the kill point")
    time.sleep(0.05)
  raise AssertionError("kill point not reached in time")


def final_state(workdir):
  import orbax.checkpoint as ocp

  from astrollama_jax.checkpoints import store

  loaded = store.load_model(str(workdir))
  assert loaded.step == STEPS
  opt = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(STEPS), "opt_state")
  )
  return loaded.params, opt


def kill_and_resume(tmp_path, cmd, last_kill_step):
  """Run ``cmd(workdir)`` whole, and again killed with -9 at a random step after the first
  checkpoint, then restarted. Returns (whole workdir, broken workdir, summary, killed_after)."""
  whole, broken = tmp_path / "whole", tmp_path / "broken"
  kill_at = random.Random().randint(EVERY + 1, last_kill_step)
  ref = start(cmd(whole), 1, tmp_path / "whole.log")
  victim = start(cmd(broken), 1, tmp_path / "broken.log")
  try:
    wait_for(
      lambda: (
        (broken / "checkpoints" / str(EVERY)).is_dir()
        and any(r["step"] >= kill_at for r in records(broken, "train"))
      ),
      victim,
    )
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
  finally:
    if victim.poll() is None:
      victim.kill()
  killed_after = max(r["step"] for r in records(broken, "train"))
  assert killed_after < STEPS, "the run finished before it was killed"
  summary = finish(start(cmd(broken), 1, tmp_path / "broken.log"), tmp_path / "broken.log")
  finish(ref, tmp_path / "whole.log")
  return whole, broken, summary, killed_after


def assert_same_losses_and_end_state(whole, broken):
  """Same logged losses, and bit-identical final parameters and optimizer state."""
  losses = {r["step"]: r["loss"] for r in records(whole, "train")}
  assert all(losses[r["step"]] == r["loss"] for r in records(broken, "train"))
  (p_whole, o_whole), (p_broken, o_broken) = final_state(whole), final_state(broken)
  import jax

  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_whole, p_broken
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), o_whole, o_broken
  )


# --- the eval command in this process, torch references ------------------------------------


def make_hf_folder(cfg, folder, seed=1):
  """Save a random tiny LlamaForCausalLM (float32) and return the torch model."""
  from hf_reference import save_hf_model

  return save_hf_model(cfg, folder, seed=seed)


def run_cli(capsys, *args: str) -> dict:
  """Run ``python -m astrollama_jax eval`` in this process; return its final JSON line.

  The flags live in a private ``FlagValues``, so nothing is defined on absl's global set.
  """
  from astrollama_jax.commands import eval as cli

  fv = flags.FlagValues()
  cli.define_flags(fv)
  argv = fv(["eval", "--noprogress", *args])
  cli.main(argv, fv)
  out = capsys.readouterr().out.strip().splitlines()
  assert out, "the command printed nothing"
  return json.loads(out[-1])


def torch_token_logprobs(model, ids) -> np.ndarray:
  """log p(ids[t] | ids[:t]) for t >= 1 with one plain forward pass (float64 result)."""
  import torch

  with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
  lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
  return lp.numpy()


def torch_logprobs_given(model, context, target) -> np.ndarray:
  """log p(target | context), token by token, from one forward pass over context + target."""
  full = list(context) + list(target)
  return torch_token_logprobs(model, full)[len(context) - 1 :]


# --- Meta's download layout ----------------------------------------------------------------


def _meta_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:  # noqa: F821
  """Undo HF's q/k permutation: half-split rotary rows -> Meta's interleaved pairs."""
  rows, cols = w.shape
  return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model, cfg, folder, mp: int, dtype=None, tokenizer_path=None):
  """Meta's download layout: params.json + consolidated.NN.pth, one file per model-parallel rank."""
  import torch

  dtype = dtype or torch.float32
  os.makedirs(folder, exist_ok=True)
  sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
  full = {
    "tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
    "norm.weight": (sd["model.norm.weight"], None),
    "output.weight": (sd["lm_head.weight"], 0),
  }
  for i in range(cfg.n_layers):
    p, m = f"model.layers.{i}.", f"layers.{i}."
    full.update(
      {
        m + "attention.wq.weight": (
          _meta_from_hf(sd[p + "self_attn.q_proj.weight"], cfg.n_heads),
          0,
        ),
        m + "attention.wk.weight": (
          _meta_from_hf(sd[p + "self_attn.k_proj.weight"], cfg.n_kv_heads),
          0,
        ),
        m + "attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
        m + "attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
        m + "feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
        m + "feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
        m + "feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
        m + "attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
        m + "ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
      }
    )
  for rank in range(mp):
    shard = {
      name: (t if axis is None else t.chunk(mp, dim=axis)[rank]).clone()
      for name, (t, axis) in full.items()
    }
    shard["rope.freqs"] = torch.ones(cfg.head_dim // 2, dtype=dtype)
    torch.save(shard, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
  # multiple_of / ffn_dim_multiplier chosen so Meta's formula gives the tiny presets' ffn_dim.
  params = {
    "dim": cfg.dim,
    "n_layers": cfg.n_layers,
    "n_heads": cfg.n_heads,
    "multiple_of": 128,
    "ffn_dim_multiplier": 0.75,
    "norm_eps": cfg.norm_eps,
    "vocab_size": -1,
  }
  if cfg.n_kv_heads != cfg.n_heads:
    params["n_kv_heads"] = cfg.n_kv_heads
  with open(os.path.join(folder, "params.json"), "w") as f:
    json.dump(params, f)
  if tokenizer_path:
    os.symlink(tokenizer_path, os.path.join(folder, "tokenizer.model"))
  return folder


# --- loopback ports ------------------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(
  workdir, *args: str, processes: int, devices: int, log_dir, name: str, config="configs/demo.py"
) -> list[subprocess.Popen]:
  """``processes`` trainers of one ``jax.distributed`` job on loopback (``devices`` CPU devices
  each), logging to ``log_dir/{name}_{i}.log``."""
  port = free_port()
  return [
    start(
      train_cmd(
        workdir,
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
        config=config,
      ),
      devices,
      Path(log_dir) / f"{name}_{i}.log",
    )
    for i in range(processes)
  ]


def finish_processes(procs: list[subprocess.Popen], log_dir, name: str, timeout: float = 300):
  """Every process's ``finish`` (the summary of process 0, {} for the others; any still
  running after a failure is killed)."""
  try:
    return [
      finish(p, Path(log_dir) / f"{name}_{i}.log", timeout=timeout, summary=i == 0)
      for i, p in enumerate(procs)
    ]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


# --- the demo corpus, prepared -------------------------------------------------------------


def prepare_demo_corpus(out) -> Path:
  """``prepare`` the repository's demo corpus (15% validation) into ``out``."""
  subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "prepare",
      "--source=data/demo_corpus",
      f"--output={out}",
      "--validation_fraction=0.15",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
    timeout=120,
  )
  return Path(out)


# --- a tiny chat model served on 127.0.0.1 -------------------------------------------------

NEW = 16  # answer tokens in every test: one compiled answer bucket


def make_chat_hf_folder(folder, tokenizer_path):
  """A random tiny LLaMA saved as an HF folder with the LLaMA-2 tokenizer and chat template."""
  from hf_reference import TINY_GQA, save_hf_model

  model = save_hf_model(TINY_GQA, folder, seed=1)
  write_hf_tokenizer_files(folder, tokenizer_path)
  return model


def load(folder):
  mesh = sharding.mesh_from_text(sharding.DEFAULT_MESH)
  loaded = loader.load_model(str(folder), mesh, compute_dtype="float32")
  return loaded, Tokenizer(loaded.tokenizer_path), mesh


@contextlib.contextmanager
def running(
  model,
  *,
  start: bool = True,
  generate_fn=generate,
  feedback=None,
  api_key=None,
  max_queue: int = 64,
  max_batch: int = 8,
  max_body_bytes: int = 1 << 20,
):
  """(server, batcher): a server on a free loopback port, in this process, stopped afterwards."""
  loaded, tok, mesh = model
  batcher = Batcher(
    loaded.cfg,
    loaded.params,
    tok,
    mesh=mesh,
    max_batch=max_batch,
    max_queue=max_queue,
    generate_fn=generate_fn,
  )
  if start:
    batcher.start()
  app = App(
    batcher,
    tok,
    model="tiny-chat",
    checkpoint="tiny-chat-checkpoint",
    max_seq_len=loaded.cfg.max_seq_len,
    feedback=feedback,
    api_key=api_key,
    max_body_bytes=max_body_bytes,
    default_max_tokens=NEW,
  )
  server = Server(app, "127.0.0.1", 0)
  thread = threading.Thread(
    target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
  )
  thread.start()
  try:
    yield server, batcher
  finally:
    server.shutdown()
    server.server_close()
    batcher.close()
    thread.join(timeout=30)


def client(server, **kw):
  import openai

  return openai.OpenAI(
    base_url=server.url + "/v1",
    api_key=kw.pop("api_key", "unused"),
    max_retries=0,
    timeout=120,
    **kw,
  )


def start_cli(
  *args: str, env_extra: dict[str, str] | None = None, log_path=None
) -> subprocess.Popen:
  """``python -m astrollama_jax serve ARGS`` in the background (stderr to ``log_path``)."""
  env = dict(os.environ, **(env_extra or {}))
  log = open(log_path, "wb") if log_path else subprocess.DEVNULL
  return subprocess.Popen(
    [sys.executable, "-m", "astrollama_jax", "serve", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=log,
  )


def wait_ready(
  url: str, proc: subprocess.Popen, headers: dict[str, str] | None = None, timeout: float = 240
) -> None:
  """Poll ``url`` until it answers 200 (bounded), failing early if the process died."""
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      raise AssertionError(f"server exited with {proc.returncode}")
    try:
      req = urllib.request.Request(url, headers=headers or {})
      with urllib.request.urlopen(req, timeout=5) as r:
        if r.status == 200:
          return
    except (urllib.error.URLError, ConnectionError, TimeoutError):
      pass
    time.sleep(0.5)
  raise AssertionError(f"{url} not ready after {timeout} s")


def post(
  url: str,
  body,
  headers: dict[str, str] | None = None,
  raw: bytes | None = None,
  content_type: str = "application/json",
) -> tuple[int, dict]:
  """POST JSON (or ``raw`` bytes); (status, decoded JSON body) for any status."""
  data = raw if raw is not None else json.dumps(body).encode()
  req = urllib.request.Request(
    url, data=data, method="POST", headers={"Content-Type": content_type, **(headers or {})}
  )
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())
