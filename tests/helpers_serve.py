"""A tiny chat model served on 127.0.0.1: in this process (``running``) or as the ``serve``
command (``start_cli``), and the clients that talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from helpers import REPO

from astrollama_jax import sharding
from astrollama_jax.checkpoints import loader
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.formats.hf_tokenizer import write_hf_tokenizer_files
from astrollama_jax.generation import generate
from astrollama_jax.serve.batching import Batcher
from astrollama_jax.serve.server import App, Server

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
  chat_template=None,
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
    **({"chat_template": chat_template} if chat_template else {}),
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
