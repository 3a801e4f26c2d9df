r"""Question-answer dialogues about astro-ph abstracts, from any OpenAI-compatible chat server.

AstroLLaMA-Chat's SFT mix has ~10k dialogues written by a strong chat model from arXiv abstracts.
``run`` asks a chat-completions server (OpenAI, vLLM, llama.cpp, TGI, ...) for one multi-turn
dialogue per abstract, as strict JSON, and appends it to a ShareGPT JSONL file; the ``make_qa``
command is its command line.

Endpoint: a URL ending in ``/chat/completions`` is used as given; one ending in ``/v1`` gets
``/chat/completions`` appended; anything else gets ``/v1/chat/completions``.

Robustness: at most ``Settings.concurrency`` requests in flight; 429, 5xx, timeouts and connection
errors are retried with exponential backoff and jitter (a ``Retry-After`` header is obeyed
instead); replies that are not the JSON dialogue asked for are rejected and counted. The API key
goes to the endpoint's origin only (a redirect elsewhere is refused, and no proxy is used); the
whole exchange has one deadline, replies have a size cap, and one bad reply fails its abstract
only. Output is append-only, one line per finished abstract and flushed at once, so a rerun skips
finished ids and only redoes the rest (a line cut short by a crash is dropped). Failed abstracts
are not written: rerun to retry.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
import concurrent.futures
import dataclasses
import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
from typing import Any
import urllib.parse

from absl import logging

SYSTEM_PROMPT = (
  "You are an expert astrophysicist who writes training data for an astronomy chat assistant. "
  "You answer with a single JSON object and nothing else."
)

USER_PROMPT = """Read this astro-ph abstract and write a dialogue between a curious user and \
an expert assistant about the science in it.

Title: {title}
Abstract: {abstract}

Rules:
- {min_exchanges} to {max_exchanges} exchanges; the user speaks first and the two alternate.
- The user's questions must make sense to someone who has not seen the abstract (no \
"the abstract", "this paper", "the authors").
- The assistant's answers are accurate, self-contained, use only facts supported by the \
abstract or standard astrophysics, and may use LaTeX math as in the abstract.
- Output strict JSON with exactly this shape and no text around it:
{{"dialogue": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}]}}"""


class ReplyError(ValueError):
  """A reply that is not the dialogue asked for; ``reason`` is the counting key."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


class RetryableError(Exception):
  """A failure worth retrying (429, 5xx, timeout, connection); may carry a Retry-After."""

  def __init__(self, reason: str, retry_after: float | None = None):
    super().__init__(reason)
    self.reason = reason
    self.retry_after = retry_after


class FatalRequestError(Exception):
  """A failure retrying will not fix (400, 401, 404, ...)."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run's server, model and limits (the ``make_qa`` flags)."""

  endpoint: str
  model: str
  api_key: str | None = None
  concurrency: int = 8
  max_retries: int = 5
  timeout: float = 60.0
  backoff_base: float = 1.0
  backoff_max: float = 60.0
  temperature: float = 0.7
  max_reply_bytes: int = 16 * 1024**2
  min_exchanges: int = 2
  max_exchanges: int = 4


def chat_completions_url(endpoint: str) -> str:
  """The POST URL for ``endpoint`` (see the module docstring)."""
  endpoint = endpoint.rstrip("/")
  if endpoint.endswith("/chat/completions"):
    return endpoint
  if endpoint.endswith("/v1"):
    return endpoint + "/chat/completions"
  return endpoint + "/v1/chat/completions"


def build_messages(title: str, abstract: str, settings: Settings) -> list[dict[str, str]]:
  """The system and user messages that ask for one paper's dialogue."""
  user = USER_PROMPT.format(
    title=title.strip(),
    abstract=abstract.strip(),
    min_exchanges=settings.min_exchanges,
    max_exchanges=settings.max_exchanges,
  )
  return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _strip_fences(text: str) -> str:
  """Models often wrap JSON in ```json fences despite being told not to; tolerate exactly that."""
  text = text.strip()
  if text.startswith("```"):
    text = text.split("\n", 1)[1] if "\n" in text else ""
    if text.rstrip().endswith("```"):
      text = text.rstrip()[:-3]
  return text.strip()


def parse_dialogue(content: Any) -> list[tuple[str, str]]:
  """(role, text) turns from the model's reply text; raises ``ReplyError`` naming what is wrong."""
  if not isinstance(content, str) or not content.strip():
    raise ReplyError("empty reply")
  try:
    obj = json.loads(_strip_fences(content))
  except json.JSONDecodeError:
    raise ReplyError("reply is not JSON") from None
  except RecursionError:
    raise ReplyError("reply is nested too deeply") from None
  turns = obj.get("dialogue") if isinstance(obj, dict) else obj
  if not isinstance(turns, list) or not turns:
    raise ReplyError("reply has no dialogue list")
  out = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
      raise ReplyError("turn is not {role, content}")
    if not isinstance(turn["content"], str) or not turn["content"].strip():
      raise ReplyError("empty turn")
    expected = "user" if i % 2 == 0 else "assistant"
    if turn["role"].lower() != expected:
      raise ReplyError("roles do not alternate from user")
    out.append((expected, turn["content"].strip()))
  if len(out) % 2:
    raise ReplyError("dialogue ends without an answer")
  return out


def _retry_after(value: str | None) -> float | None:
  """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/garbled."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


MAX_REDIRECTS = 3


def _origin(url: str) -> tuple[str, str, int | None]:
  parts = urllib.parse.urlsplit(url)
  port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
  return parts.scheme, (parts.hostname or "").lower(), port


def _abort(conn: http.client.HTTPConnection) -> None:
  """Unblock a read in progress on ``conn`` (the deadline passed while the server dripped)."""
  if conn.sock is not None:
    try:
      conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass


def _exchange(
  url: str, data: bytes, headers: dict[str, str], timeout: float, max_bytes: int
) -> tuple[int, Any, bytes]:
  """One HTTP POST, all of it (connect, headers, body) within ``timeout`` seconds."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https") or not parts.hostname:
    raise FatalRequestError(f"not an http(s) URL: {url}")
  conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
  conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
  deadline = time.monotonic() + timeout
  timer = threading.Timer(timeout, _abort, (conn,))
  timer.daemon = True
  timer.start()
  try:
    conn.request(
      "POST",
      urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
      body=data,
      headers=headers,
    )
    response = conn.getresponse()
    if int(response.headers.get("Content-Length") or 0) > max_bytes:
      raise FatalRequestError(f"reply larger than {max_bytes} bytes")
    chunks, size = [], 0
    while chunk := response.read1(1 << 16):
      size += len(chunk)
      if size > max_bytes:
        raise FatalRequestError(f"reply larger than {max_bytes} bytes")
      if time.monotonic() > deadline:
        raise RetryableError("timeout")
      chunks.append(chunk)
    return response.status, response.headers, b"".join(chunks)
  except TimeoutError:
    raise RetryableError("timeout") from None
  except (OSError, http.client.HTTPException):
    raise RetryableError(
      "timeout" if time.monotonic() >= deadline else "connection error"
    ) from None
  finally:
    timer.cancel()
    conn.close()


def post_chat(
  url: str, body: dict, api_key: str | None, timeout: float, max_bytes: int = 16 * 1024**2
) -> dict:
  """One POST; returns the decoded response or raises RetryableError / FatalRequestError.

  The API key goes to ``url``'s origin only: a redirect to another scheme, host or port is
  refused (it is never followed, with or without the key). ``timeout`` bounds the whole exchange,
  not each socket read, and a reply over ``max_bytes`` is abandoned.
  """
  headers = {"Content-Type": "application/json"}
  if api_key:
    headers["Authorization"] = f"Bearer {api_key}"
  data = json.dumps(body).encode()
  for _ in range(MAX_REDIRECTS + 1):
    status, reply_headers, raw = _exchange(url, data, headers, timeout, max_bytes)
    if status not in (301, 302, 303, 307, 308):
      break
    target = urllib.parse.urljoin(url, reply_headers.get("Location") or "")
    if _origin(target) != _origin(url):
      scheme, host, port = _origin(target)
      raise FatalRequestError(f"redirect to another origin refused ({scheme}://{host}:{port})")
    url = target
  else:
    raise FatalRequestError("too many redirects")
  if status == 429 or status >= 500:
    raise RetryableError(f"http {status}", _retry_after(reply_headers.get("Retry-After")))
  if status >= 300:
    raise FatalRequestError(f"http {status}")
  try:
    return json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise RetryableError("response body is not JSON") from None
  except RecursionError:
    raise FatalRequestError("response body is nested too deeply") from None


def backoff_delay(attempt: int, settings: Settings, retry_after: float | None) -> float:
  """Server's Retry-After if given, else full-jitter exponential backoff (capped)."""
  if retry_after is not None:
    return min(retry_after, settings.backoff_max)
  return random.uniform(0.0, min(settings.backoff_max, settings.backoff_base * 2**attempt))


def dialogue_for(
  paper: dict, settings: Settings, sleep: Callable[[float], None] = time.sleep
) -> list[tuple[str, str]]:
  """One paper's dialogue, retrying transient failures; raises ReplyError/Fatal/Retryable."""
  body = {
    "model": settings.model,
    "messages": build_messages(paper["title"], paper["abstract"], settings),
    "temperature": settings.temperature,
  }
  url = chat_completions_url(settings.endpoint)
  for attempt in range(settings.max_retries + 1):
    try:
      response = post_chat(url, body, settings.api_key, settings.timeout, settings.max_reply_bytes)
      break
    except RetryableError as e:
      if attempt == settings.max_retries:
        raise
      delay = backoff_delay(attempt, settings, e.retry_after)
      logging.info("%s: %s, retry %d in %.2fs", paper["id"], e.reason, attempt + 1, delay)
      sleep(delay)
  try:
    content = response["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise ReplyError("response has no choices[0].message.content") from None
  return parse_dialogue(content)


def to_record(paper: dict, turns: list[tuple[str, str]], model: str) -> dict:
  """One output line: the dialogue in ShareGPT form, keyed by the paper's id (for resuming)."""
  names = {"user": "human", "assistant": "gpt"}
  return {
    "id": paper["id"],
    "source_id": paper["id"],
    "title": paper["title"],
    "model": model,
    "conversations": [{"from": names[r], "value": t} for r, t in turns],
  }


def finished_ids(output: str) -> set[str]:
  """Ids already in ``output``; a last line cut short by a crash is cut off the file."""
  if not os.path.exists(output):
    return set()
  done = set()
  with open(output, "rb") as f:
    data = f.read()
  good_end = 0
  for line in data.splitlines(keepends=True):
    try:
      done.add(str(json.loads(line)["id"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
      if line.endswith(b"\n"):
        logging.warning("%s: unreadable line kept as is (not a crash tail)", output)
      else:
        logging.warning("%s: dropping a truncated last line (%d bytes)", output, len(line))
        break
    good_end += len(line)
  if good_end < len(data):
    with open(output, "r+b") as f:
      f.truncate(good_end)
  elif data and not data.endswith(b"\n"):
    with open(output, "ab") as f:  # complete JSON without newline: end the line before appending
      f.write(b"\n")
  return done


def read_abstracts(path: str, limit: int | None, report: collections.Counter) -> Iterator[dict]:
  """Papers {id, title, abstract} from a JSONL file (our arXiv metadata); bad lines counted."""
  seen = set()
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if limit is not None and i >= limit:
        return
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        paper = {
          "id": str(rec["id"]),
          "title": str(rec.get("title", "")),
          "abstract": rec["abstract"],
        }
        if not isinstance(paper["abstract"], str) or not paper["abstract"].strip():
          raise ValueError("empty abstract")
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        report["bad abstract record"] += 1
        logging.warning("%s:%d: skipped (%s)", path, i + 1, e)
        continue
      if paper["id"] in seen:
        report["duplicate id"] += 1
        continue
      seen.add(paper["id"])
      yield paper


def run(
  abstracts: str,
  output: str,
  settings: Settings,
  limit: int | None = None,
  sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
  """Generate dialogues for every unfinished abstract; returns the summary dict."""
  done = finished_ids(output)
  input_report: collections.Counter = collections.Counter()
  papers = list(read_abstracts(abstracts, limit, input_report))
  todo = [p for p in papers if p["id"] not in done]
  failed: collections.Counter = collections.Counter()
  written = 0
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with (
    open(output, "a", encoding="utf-8") as out,
    concurrent.futures.ThreadPoolExecutor(max_workers=max(1, settings.concurrency)) as pool,
  ):
    futures = {pool.submit(dialogue_for, p, settings, sleep): p for p in todo}
    for future in concurrent.futures.as_completed(futures):
      paper = futures[future]
      try:
        turns = future.result()
      except (ReplyError, RetryableError, FatalRequestError) as e:
        failed[e.reason] += 1
        logging.warning("%s: failed (%s)", paper["id"], e.reason)
        continue
      except Exception as e:  # noqa: BLE001 - one paper's failure never discards the others'
        failed[f"unexpected {type(e).__name__}"] += 1
        logging.exception("%s: failed", paper["id"])
        continue
      out.write(json.dumps(to_record(paper, turns, settings.model), ensure_ascii=False) + "\n")
      out.flush()
      written += 1
  summary = {
    "done": written,
    "skipped_existing": len(papers) - len(todo),
    "failed": dict(failed),
    "bad_input": dict(input_report),
  }
  logging.info("make_qa summary: %s", json.dumps(summary))
  return summary
