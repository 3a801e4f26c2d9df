"""A conversation with a loaded model: history, system prompt, sampling settings, statistics.

The conversation is kept in the chat format of its template. The history is trimmed from the oldest
exchange so that prompt + ``max_new_tokens`` fit in the model's context; the system prompt is never
dropped (the format folds it into the first user turn). Answers stream through ``TextStream``.
The ``chat`` command's REPL and the demo talk to the model through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from astrollama_jax.data.chat_formats import ASSISTANT, USER, Conversation
from astrollama_jax.data.chat_templates import LLAMA2, ChatTemplate
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.generation import TextStream, generate
from astrollama_jax.model.config import LlamaConfig


class ChatSession:
  """One conversation with a loaded model; ``reply`` answers a message and remembers it."""

  def __init__(
    self,
    cfg: LlamaConfig,
    params: Any,
    tokenizer: Tokenizer,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    mesh: Any = None,
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
    """Forget the exchanges (the system prompt stays)."""
    self.history = []

  def set_system(self, text: str | None) -> None:
    """Set the system prompt; empty or None removes it."""
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
    """Totals over the answered messages: turns, tokens, seconds, speed, exchanges dropped."""
    new = sum(e["new_tokens"] for e in self.log)
    secs = sum(e["seconds"] for e in self.log)
    return {
      "turns": len(self.log),
      "generated_tokens": new,
      "seconds": round(secs, 3),
      "tokens_per_s": round(new / max(secs, 1e-9), 2),
      "dropped_exchanges": sum(e["dropped"] for e in self.log),
    }
