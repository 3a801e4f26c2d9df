"""The OpenAI request and response shapes: checking bodies, building answers and stream chunks.

Only what this server can honour is accepted: an unknown field, or a known one it cannot serve
(``n > 1``, log-probabilities, penalties), is a 400 that names the field, rather than being
ignored and answered as if it had been applied.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
import time
from typing import Any
import uuid

from astrollama_jax.data.chat_formats import (
  ASSISTANT,
  USER,
  ChatFormatError,
  Conversation,
)
from astrollama_jax.data.chat_templates import ChatTemplate
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.serve.batching import Result, Sampling

_COMMON = {
  "model",
  "max_tokens",
  "temperature",
  "top_p",
  "top_k",
  "stop",
  "seed",
  "stream",
  "stream_options",
  "n",
  "user",
  "presence_penalty",
  "frequency_penalty",
  "logprobs",
}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
MAX_STOPS = 4
MAX_PROMPTS = 16


class ApiError(Exception):
  """An answer other than 200, with OpenAI's error body."""

  def __init__(
    self,
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] = (),
  ):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = dict(headers)

  def body(self) -> dict[str, Any]:
    return {
      "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
    }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
  return ApiError(400, message, param=param, code=code)


@dataclasses.dataclass
class ParsedRequest:
  kind: str  # "chat" | "completion"
  model: str
  prompts: list[list[int]]  # one per choice
  sampling: Sampling
  stream: bool
  include_usage: bool
  messages: list[dict[str, str]] | None = None  # chat: the conversation, as OpenAI messages


# --- fields -----------------------------------------------------------------------------------


def _number(
  body: Mapping[str, Any],
  name: str,
  default: float | None,
  lo: float,
  hi: float,
  integer: bool = False,
) -> Any:
  value = body.get(name)
  if value is None:
    return default
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
    raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
  if not lo <= value <= hi:
    raise bad(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
  return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
  value = body.get(name, False)
  if value is None:
    return False
  if not isinstance(value, bool):
    raise bad(f"'{name}' must be true or false, got {value!r}", name)
  return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if (
    not isinstance(stops, list)
    or not all(isinstance(s, str) and s for s in stops)
    or len(stops) > MAX_STOPS
  ):
    raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
  return tuple(stops)


def _unsupported(body: Mapping[str, Any], allowed: set[str]) -> None:
  unknown = sorted(set(body) - allowed)
  if unknown:
    raise bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
  if body.get("n") not in (None, 1):
    raise bad("only n=1 is supported", "n")
  if body.get("best_of") not in (None, 1):
    raise bad("only best_of=1 is supported", "best_of")
  for name in ("presence_penalty", "frequency_penalty"):
    if body.get(name) not in (None, 0, 0.0):
      raise bad(f"'{name}' is not supported (only 0)", name)
  for name in ("logprobs", "top_logprobs", "echo", "suffix"):
    if body.get(name) not in (None, False, 0, ""):
      raise bad(f"'{name}' is not supported", name)


def _utf8(text: str, param: str) -> str:
  """``text``, or a 400 if it holds a lone surrogate (JSON allows "\\ud800", UTF-8 does not)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise bad(f"{param} holds text that cannot be encoded as UTF-8", param) from None
  return text


def surrogate_at(obj: Any) -> tuple[str, str | None] | None:
  """Where a decoded JSON body holds a lone surrogate ("\\ud800" is valid JSON, but no UTF-8
  text): (a description, the top-level field), or None. Iterative: any depth json accepts."""
  stack: list[tuple[Any, str, str | None]] = [(obj, "", None)]
  while stack:
    value, path, field = stack.pop()
    if isinstance(value, str):
      if not encodable(value):
        return (f"'{path}'" if path else "the body"), field
    elif isinstance(value, dict):
      for key, item in value.items():
        if not encodable(key):
          return f"the field name {ascii(key)}" + (f" in '{path}'" if path else ""), field
        stack.append((item, f"{path}.{key}" if path else key, field or key))
    elif isinstance(value, list):
      stack.extend((item, f"{path}[{i}]", field) for i, item in enumerate(value))
  return None


def encodable(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _text_content(content: Any, i: int) -> str:
  """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
  if isinstance(content, str):
    return _utf8(content, f"messages[{i}]")
  if isinstance(content, list) and all(
    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
    for p in content
  ):
    return _utf8("".join(p["text"] for p in content), f"messages[{i}]")
  raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}]")


def conversation_of(messages: Any) -> tuple[Conversation, list[dict[str, str]]]:
  """OpenAI messages -> a ``Conversation`` ending with the user turn to answer, and the messages
  normalised to {role, content} strings (what a feedback row stores)."""
  if not isinstance(messages, list) or not messages:
    raise bad("'messages' must be a non-empty list", "messages")
  clean = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
      raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in ("system", USER, ASSISTANT):
      raise bad(
        f"messages[{i}].role {m['role']!r} is not supported (system, user, assistant)",
        f"messages[{i}]",
      )
    clean.append({"role": role, "content": _text_content(m["content"], i)})
  system = clean[0]["content"] if clean[0]["role"] == "system" else None
  turns = tuple((m["role"], m["content"]) for m in clean[1 if system is not None else 0 :])
  try:
    conv = Conversation(turns=turns, system=system)
  except ChatFormatError as e:
    raise bad(
      f"messages: {e} (after an optional first system message, roles alternate user, "
      f"assistant, ...)",
      "messages",
    ) from None
  if not turns or turns[-1][0] != USER:
    raise bad("messages must end with a user message", "messages")
  return conv, clean


def _budget(
  prompt_len: int, body: Mapping[str, Any], name: str, ctx: int, default: int, param: str
) -> int:
  """``max_tokens`` for a prompt: the asked one, else the default capped by the context left."""
  asked = _number(body, name, None, 1, 1 << 30, integer=True)
  room = ctx - prompt_len
  if asked is None:
    asked = min(default, room)
  if asked < 1 or prompt_len + asked > ctx:
    raise bad(
      f"This model's maximum context length is {ctx} tokens. However, you requested "
      f"{prompt_len + max(asked, 1)} tokens ({prompt_len} in the {param}, {max(asked, 1)} "
      f"in the completion). Please reduce the length of the {param} or completion.",
      param,
      "context_length_exceeded",
    )
  return asked


def parse(
  kind: str,
  body: Any,
  *,
  model: str,
  tokenizer: Tokenizer,
  max_seq_len: int,
  default_max_tokens: int,
  chat_template: ChatTemplate,
) -> ParsedRequest:
  """Check a request body and turn it into prompts and sampling settings (or an ``ApiError``)."""
  if not isinstance(body, dict):
    raise bad("the request body must be a JSON object")
  _unsupported(body, CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS)
  if body.get("model") is None:
    raise bad("'model' is required", "model")
  if body["model"] != model:
    raise ApiError(
      404,
      f"The model {body['model']!r} does not exist; this server has {model!r}",
      param="model",
      code="model_not_found",
    )
  options = body.get("stream_options")
  if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
    raise bad("'stream_options' must be an object with 'include_usage'", "stream_options")
  messages, stops = None, _stops(body)
  if kind == "chat":
    conv, messages = conversation_of(body.get("messages"))
    prompts, param = [chat_template.prompt_ids(tokenizer, conv)], "messages"
    stops = (*chat_template.stop_strings, *stops)
  else:
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if (
      not isinstance(texts, list)
      or not texts
      or len(texts) > MAX_PROMPTS
      or not all(isinstance(t, str) for t in texts)
    ):
      raise bad(f"'prompt' must be a string or a list of 1 to {MAX_PROMPTS} strings", "prompt")
    prompts, param = [tokenizer.encode(_utf8(t, "prompt"), bos=True) for t in texts], "prompt"
  name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = min(
    _budget(len(p), body, name, max_seq_len, default_max_tokens, param) for p in prompts
  )
  temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
  sampling = Sampling(
    max_tokens=max_tokens,
    temperature=float(temperature),
    top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
    top_k=int(_number(body, "top_k", 0, 0, 1 << 20, integer=True)),
    seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
    stop=stops,
  )
  if sampling.top_p <= 0:
    raise bad("'top_p' must be greater than 0", "top_p")
  if sampling.seed is not None:
    sampling = dataclasses.replace(sampling, seed=sampling.seed % (1 << 31))
  stream = _flag(body, "stream")
  include_usage = bool(options and options.get("include_usage"))
  return ParsedRequest(kind, model, prompts, sampling, stream, include_usage, messages)


# --- answers -----------------------------------------------------------------------------------


def new_id(kind: str) -> str:
  return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(req: ParsedRequest, results: list[Result]) -> dict[str, int]:
  prompt = sum(len(p) for p in req.prompts)
  completion = sum(r.completion_tokens for r in results)
  return {
    "prompt_tokens": prompt,
    "completion_tokens": completion,
    "total_tokens": prompt + completion,
  }


def response(req: ParsedRequest, rid: str, created: int, results: list[Result]) -> dict[str, Any]:
  """The whole (non-streamed) answer."""
  if req.kind == "chat":
    choices = [
      {
        "index": i,
        "message": {"role": "assistant", "content": r.text},
        "finish_reason": r.finish_reason,
        "logprobs": None,
      }
      for i, r in enumerate(results)
    ]
    obj = "chat.completion"
  else:
    choices = [
      {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
      for i, r in enumerate(results)
    ]
    obj = "text_completion"
  return {
    "id": rid,
    "object": obj,
    "created": created,
    "model": req.model,
    "choices": choices,
    "usage": usage(req, results),
    "system_fingerprint": None,
  }


def chunk(
  req: ParsedRequest,
  rid: str,
  created: int,
  index: int | None,
  text: str | None = None,
  finish_reason: str | None = None,
  first: bool = False,
  usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
  """One server-sent event of a streamed answer (``index=None``: the closing usage chunk)."""
  if req.kind == "chat":
    obj = "chat.completion.chunk"
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
    if text:
      delta["content"] = text
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
  else:
    obj = "text_completion"
    choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
  out = {
    "id": rid,
    "object": obj,
    "created": created,
    "model": req.model,
    "choices": [] if index is None else [choice],
    "system_fingerprint": None,
  }
  if usage_counts is not None:
    out["usage"] = usage_counts
  return out


def now() -> int:
  return int(time.time())
