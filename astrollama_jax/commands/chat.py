"""Multi-turn chat on the command line: ``python -m astrollama_jax chat --checkpoint=DIR``.

Reads user lines from stdin (or ``--message``, repeatable, for scripts and the demo) and streams
each answer as it is generated; the conversation itself (in the checkpoint's chat format,
``--chat_template``; history trimmed from the oldest exchange to fit the context) is
``astrollama_jax.chat_session.ChatSession``.

Streaming prints the new suffix of ``decode(all generated ids)`` rather than decoding ids one by
one: SentencePiece puts word-initial spaces inside the pieces, and byte-fallback characters span
several ids, so only the decoded whole is right. A tail that could be the start of a stop string,
or an incomplete UTF-8 character, is held back until it is resolved.

Commands: /reset, /system TEXT, /help, /quit (EOF also ends).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import sys
from typing import TextIO

from absl import flags

from astrollama_jax.chat_session import ChatSession
from astrollama_jax.commands import cli
from astrollama_jax.errors import UserError
from astrollama_jax.generation import check_sampling
from astrollama_jax.util import checks, tables

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (/system alone removes it)
  /help           this text
  /quit           leave (so does end of input)"""


def run_repl(session: ChatSession, lines: Iterable[str], out: TextIO, echo: bool = False) -> None:
  """Answer lines until /quit or the end of ``lines``; commands start with '/'."""

  def emit(text: str) -> None:
    out.write(text)
    out.flush()

  for line in lines:
    line = line.strip()
    if not line:
      continue
    try:
      checks.check_text(line, "input")
    except UserError as e:
      emit(f"[error] {e}; line ignored\n")
      continue
    if echo:
      emit(f">>> {line}\n")
    if line.startswith("/"):
      cmd, _, arg = line.partition(" ")
      if cmd in ("/quit", "/exit"):
        break
      elif cmd == "/reset":
        session.reset()
        emit("[conversation cleared]\n")
      elif cmd == "/system":
        session.set_system(arg.strip())
        emit(f"[system prompt {'set' if session.system else 'removed'}]\n")
      elif cmd == "/help":
        emit(HELP + "\n")
      else:
        emit(f"[unknown command {cmd}; /help lists them]\n")
      continue
    try:
      session.reply(line, emit)
    except ValueError as e:
      emit(f"[error] {e}")
    emit("\n")


def _stdin_lines(interactive: bool) -> Iterable[str]:
  if not interactive:
    # Undecodable bytes become lone surrogates, which run_repl answers with an error line.
    sys.stdin.reconfigure(errors="surrogateescape")
    yield from sys.stdin
    return
  print(HELP, flush=True)
  while True:
    try:
      yield input(">>> ")
    except EOFError:
      print()
      return


def main(argv: Sequence[str]) -> None:
  cli.no_extra_args(argv)
  F = flags.FLAGS
  check_sampling(F.max_new_tokens, F.temperature, F.top_k, F.top_p)
  loaded = cli.load_from_flags(F)
  cfg, params, tokenizer, mesh = loaded.cfg, loaded.params, loaded.open_tokenizer(), loaded.mesh
  session = ChatSession(
    cfg,
    params,
    tokenizer,
    system=F.system,
    max_new_tokens=F.max_new_tokens,
    temperature=F.temperature,
    top_k=F.top_k,
    top_p=F.top_p,
    seed=F.seed,
    stop_strings=F.stop,
    mesh=mesh,
    chunk_size=F.stream_chunk,
    chat_template=cli.chat_template_from_flags(F),
  )
  interactive = not F.message and sys.stdin.isatty()
  lines = F.message if F.message else _stdin_lines(interactive)
  run_repl(session, lines, sys.stdout, echo=not interactive)
  rows = [
    {
      "turn": i,
      "prompt": e["prompt_tokens"],
      "new": e["new_tokens"],
      "dropped": e["dropped"],
      "finish": e["finish"],
      "seconds": e["seconds"],
    }
    for i, e in enumerate(session.log)
  ]
  tables.report("\nchat", session.summary(), rows)


def define_flags() -> None:
  cli.define_sampling_flags(temperature=0.7, top_p=0.9, max_new_tokens=256)
  flags.DEFINE_multi_string(
    "message", [], "Answer these messages in turn and exit (instead of stdin)."
  )
  flags.DEFINE_integer("stream_chunk", 1, "Decode steps between streamed updates.")
