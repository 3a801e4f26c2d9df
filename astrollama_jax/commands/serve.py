"""``python -m astrollama_jax serve``: an OpenAI-compatible server and the expert feedback page.

    python -m astrollama_jax serve --checkpoint=hf/astrollama-7b-chat [--host=127.0.0.1] \\
        [--port=8000] [--feedback_db=ratings.sqlite] [--api_key_env=ASTROLLAMA_API_KEY]

``GET /v1/models``, ``POST /v1/chat/completions`` (the checkpoint's chat template) and
``POST /v1/completions``, streamed with ``"stream": true``; the page at ``/`` chats with the
model and stores each expert rating in ``--feedback_db``. SIGINT or SIGTERM stop it; it then
prints the request counts as a table and one JSON line.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import signal
import threading

from absl import flags, logging

from astrollama_jax.commands import cli
from astrollama_jax.errors import UserError
from astrollama_jax.util import tables


def define_flags() -> None:
  """The command's flags (defined when run, never on import)."""
  flags.DEFINE_string(
    "host", "127.0.0.1", "Address to bind (the default answers this machine only)."
  )
  flags.DEFINE_integer("port", 8000, "TCP port (0: any free port, logged at start).")
  flags.DEFINE_string(
    "api_key_env",
    None,
    "Name of an environment variable holding an API key; every endpoint then "
    "wants 'Authorization: Bearer KEY' (the page asks for it).",
  )
  flags.DEFINE_string(
    "feedback_db",
    None,
    "SQLite file for the page's ratings (created if absent; "
    "without it the page chats but cannot save ratings).",
  )
  flags.DEFINE_string(
    "model_name", None, "Model id in the API (default: the checkpoint's folder name)."
  )
  flags.DEFINE_integer("max_batch", 8, "Requests decoded together in one call.")
  flags.DEFINE_integer(
    "max_queue",
    64,
    "Prompts that may wait; more are answered 429 (a request with more prompts than this, 400).",
  )
  flags.DEFINE_integer(
    "max_connections",
    64,
    "Connections served at once (each holds a thread); one more is answered 503.",
  )
  flags.DEFINE_integer("max_tokens", 256, "Default max_tokens of a request that gives none.")
  flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body accepted (413 beyond).")
  flags.DEFINE_integer("stream_chunk", 4, "Decode steps between streamed updates.")
  flags.DEFINE_float("batch_window_ms", 5.0, "How long a new call waits for more requests to join.")
  cli.define(
    *cli.MODEL_FLAGS,
    "chat_template",
    required=["checkpoint"],
  )


def main(argv: Sequence[str]) -> None:
  cli.no_extra_args(argv)
  F = flags.FLAGS
  api_key = None
  if F.api_key_env:
    api_key = os.environ.get(F.api_key_env, "")
    if not api_key:
      raise UserError(f"--api_key_env={F.api_key_env}: that environment variable is empty")
  for name in (
    "max_batch",
    "max_queue",
    "max_connections",
    "max_tokens",
    "max_body_bytes",
    "stream_chunk",
  ):
    if getattr(F, name) < 1:
      raise UserError(f"--{name} must be >= 1, got {getattr(F, name)}")
  from astrollama_jax.feedback.store import FeedbackStore
  from astrollama_jax.serve.batching import Batcher
  from astrollama_jax.serve.server import App, Server

  store = FeedbackStore(F.feedback_db) if F.feedback_db else None
  loaded = cli.load_from_flags(F)
  cfg, params, tokenizer, mesh = loaded.cfg, loaded.params, loaded.open_tokenizer(), loaded.mesh
  if F.max_tokens >= cfg.max_seq_len:
    raise UserError(
      f"--max_tokens={F.max_tokens} leaves no room for a prompt in the context of {cfg.max_seq_len}"
    )
  batcher = Batcher(
    cfg,
    params,
    tokenizer,
    mesh=mesh,
    max_batch=F.max_batch,
    max_queue=F.max_queue,
    chunk_size=F.stream_chunk,
    window_s=F.batch_window_ms / 1000,
  ).start()
  name = F.model_name or os.path.basename(os.path.normpath(F.checkpoint))
  app = App(
    batcher,
    tokenizer,
    model=name,
    checkpoint=os.path.abspath(F.checkpoint),
    max_seq_len=cfg.max_seq_len,
    feedback=store,
    api_key=api_key,
    max_body_bytes=F.max_body_bytes,
    default_max_tokens=F.max_tokens,
    chat_template=cli.chat_template_from_flags(F),
  )
  try:
    server = Server(app, F.host, F.port, max_connections=F.max_connections)
  except OSError as e:
    raise UserError(f"cannot listen on {F.host}:{F.port}: {e.strerror or e}") from None

  def stop(signum, frame):  # shutdown() waits for serve_forever: call it from another thread
    logging.info("signal %d: stopping", signum)
    threading.Thread(target=server.shutdown, daemon=True).start()

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  logging.warning(
    "serving %s on %s (page: %s/, API: %s/v1)", name, server.url, server.url, server.url
  )
  try:
    server.serve_forever(poll_interval=0.2)
  finally:
    server.server_close()
    batcher.close()
    if store is not None:
      store.close()
  summary = {
    "model": name,
    "url": server.url,
    "responses": dict(app.counts),
    "feedback_db": F.feedback_db,
    **batcher.stats,
  }
  tables.report("serve", summary)
