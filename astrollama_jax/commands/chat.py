"""Multi-turn chat on the command line: ``python -m astrollama_jax chat --checkpoint=DIR``.

Reads user lines from stdin (or ``--message``, repeatable, for scripts and the demo), streams each
answer as it is generated and keeps the conversation in the checkpoint's chat format
(``--chat_template``). The history is trimmed from the oldest exchange so that prompt +
``max_new_tokens`` fit in the model's context; the system prompt is never dropped (the template
puts it in the first kept exchange).

Streaming prints the new suffix of ``decode(all generated ids)`` rather than decoding ids one by
one: SentencePiece puts word-initial spaces inside the pieces, and byte-fallback characters span
several ids, so only the decoded whole is right. A tail that could be the start of a stop string,
or an incomplete UTF-8 character, is held back until it is resolved.

Commands: /reset, /system TEXT, /help, /quit (EOF also ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import sys
from typing import TextIO

from absl import flags

from astrollama_jax.commands import cli
from astrollama_jax.data.chat_formats import ASSISTANT, USER, Conversation
from astrollama_jax.data.chat_templates import LLAMA2, ChatTemplate
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.errors import UserError
from astrollama_jax.generation import TextStream, check_sampling, generate
from astrollama_jax.model.config import LlamaConfig
from astrollama_jax.util import checks, tables

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (/system alone removes it)
  /help           this text
  /quit           leave (so does end of input)"""


class ChatSession:
  """One conversation with a loaded model: history, system prompt, sampling settings, statistics."""

  def __init__(
    self,
    cfg: LlamaConfig,
    params,
    tokenizer: Tokenizer,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    mesh=None,
    chunk_size: int = 1,
    chat_template: ChatTemplate = LLAMA2,
  ):
    if max_new_tokens >= cfg.max_seq_len:
      raise ValueError(
        f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
        f"context of {cfg.max_seq_len} tokens"
      )
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    self.system = system or None
    self.sampling = dict(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    self.template = chat_template
    self.seed, self.chunk_size = seed, chunk_size
    self.stop_strings = [*chat_template.stop_strings, *stop_strings]
    self.history: list[tuple[str, str]] = []  # (user, assistant) exchanges
    self.log: list[dict] = []  # one entry per answered message

  def reset(self) -> None:
    self.history = []

  def set_system(self, text: str | None) -> None:
    self.system = text or None

  def prompt_ids(self, message: str) -> tuple[list[int], int]:
    """Ids of history + ``message`` within the context budget, and how many old exchanges drop."""
    budget = self.cfg.max_seq_len - self.sampling["max_new_tokens"]
    for drop in range(len(self.history) + 1):
      turns = [t for u, a in self.history[drop:] for t in ((USER, u), (ASSISTANT, a))]
      conv = Conversation(turns=tuple(turns) + ((USER, message),), system=self.system)
      ids = self.template.prompt_ids(self.tokenizer, conv)
      if len(ids) <= budget:
        return ids, drop
    raise ValueError(
      f"the message (with the system prompt) is {len(ids)} tokens; at most {budget} fit "
      f"in the context of {self.cfg.max_seq_len} with max_new_tokens="
      f"{self.sampling['max_new_tokens']}"
    )

  def reply(self, message: str, emit: Callable[[str], None] | None = None) -> str:
    """Answer ``message`` (streaming text pieces to ``emit``), add the exchange to the history."""
    ids, drop = self.prompt_ids(message)
    stream = TextStream(self.tokenizer, emit, self.stop_strings)
    res = generate(
      self.cfg,
      self.params,
      [ids],
      seed=self.seed + len(self.log),
      eos_id=self.template.stop_ids(self.tokenizer),
      stop_strings=self.stop_strings,
      tokenizer=self.tokenizer,
      mesh=self.mesh,
      stream=stream.update,
      chunk_size=self.chunk_size,
      **self.sampling,
    )
    stream.finish(res.texts[0])
    answer = res.texts[0].strip()
    self.history = self.history[drop:] + [(message, answer)]
    self.log.append(
      {
        "prompt_tokens": len(ids),
        "new_tokens": len(res.tokens[0]),
        "dropped": drop,
        "finish": res.finish_reasons[0],
        "seconds": res.seconds,
      }
    )
    return answer

  def summary(self) -> dict:
    new = sum(e["new_tokens"] for e in self.log)
    secs = sum(e["seconds"] for e in self.log)
    return {
      "turns": len(self.log),
      "generated_tokens": new,
      "seconds": round(secs, 3),
      "tokens_per_s": round(new / max(secs, 1e-9), 2),
      "dropped_exchanges": sum(e["dropped"] for e in self.log),
    }


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
  cfg, params, tokenizer, mesh = cli.load_from_flags(F)
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
