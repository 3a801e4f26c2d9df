"""The HTTP side: an OpenAI-compatible API, the feedback page and its ratings endpoint.

Standard library only (``http.server.ThreadingHTTPServer``: one thread per connection, HTTP/1.1
keep-alive, streams as chunked server-sent events); the model work happens on the batcher's
single worker thread, so connection threads only parse, wait and write. Idle or dribbling
clients cannot pile up threads: ``connections.BoundedServer`` caps them and times every request.

Safe by default:

* it binds to 127.0.0.1, and while bound to a loopback address it answers only requests whose
  ``Host`` names the address it binds or a loopback name (a web page elsewhere cannot reach it
  by DNS rebinding);
* a request is framed one way only (``connections.TimedHandler``), so no body, even a refused
  request's, is ever parsed as a request of its own;
* a JSON body is refused whole (400) if nested too deeply or if any name or string in it holds
  a lone surrogate, which no answer, rating or error message could be written with;
* with an API key every endpoint but the page's three static files (which hold no data) wants
  ``Authorization: Bearer KEY``; POST bodies must be JSON (``Content-Type: application/json``,
  which a cross-site form cannot send without a CORS preflight this server never grants) and at
  most ``max_body_bytes`` long;
* the page is served with a Content-Security-Policy that runs only its own script file, and the
  script writes model output with ``textContent``: an answer holding ``<script>`` is shown as
  text (and would not run even if it were inserted as HTML).

Every error is OpenAI's JSON error body with a 4xx (5xx for a failure of the model itself), and
no request can stop the server: each is handled on its own thread and ends in a response.
"""

from __future__ import annotations

import collections
import hmac
from importlib import resources
import ipaddress
import json
import threading
from typing import Any
import urllib.parse

from absl import logging

from astrollama_jax.data.chat_templates import LLAMA2, ChatTemplate
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.feedback.store import FeedbackStore, RatingError
from astrollama_jax.serve import openai_api
from astrollama_jax.serve.batching import Batcher, Job, QueueFull
from astrollama_jax.serve.connections import BoundedServer, TimedHandler
from astrollama_jax.serve.openai_api import ApiError

STATIC = {
  "/": ("page.html", "text/html; charset=utf-8"),
  "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
  "/static/page.css": ("page.css", "text/css; charset=utf-8"),
}
CSP = (
  "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
  "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
REMEMBERED_ANSWERS = 2000  # chat answers kept for rating (the newest)


class App:
  """What the handlers share: the batcher, the model's identity, the limits, the ratings."""

  def __init__(
    self,
    batcher: Batcher,
    tokenizer: Tokenizer,
    *,
    model: str,
    checkpoint: str,
    max_seq_len: int,
    feedback: FeedbackStore | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    default_max_tokens: int = 256,
    chat_template: ChatTemplate = LLAMA2,
  ):
    self.batcher, self.tokenizer, self.chat_template = batcher, tokenizer, chat_template
    self.model, self.checkpoint, self.max_seq_len = model, checkpoint, max_seq_len
    self.feedback, self.api_key = feedback, api_key
    self.max_body_bytes, self.default_max_tokens = max_body_bytes, default_max_tokens
    self._answers: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()

  def count(self, status: int) -> None:
    with self._lock:
      self.counts[str(status)] += 1

  def remember(self, rid: str, record: dict[str, Any]) -> None:
    with self._lock:
      self._answers[rid] = record
      while len(self._answers) > REMEMBERED_ANSWERS:
        self._answers.popitem(last=False)

  def recall(self, rid: str) -> dict[str, Any] | None:
    with self._lock:
      return self._answers.get(rid)


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


class Handler(TimedHandler):
  protocol_version = "HTTP/1.1"
  server_version = "astrollama-serve"
  timeout = 120  # seconds a write may wait on a client that does not read

  @property
  def app(self) -> App:
    return self.server.app  # type: ignore[attr-defined]

  def log_message(self, format: str, *args: Any) -> None:
    logging.info("%s %s", self.address_string(), format % args)

  # --- writing ---

  def _headers(
    self, status: int, ctype: str, length: int | None, extra: dict[str, str] | None = None
  ) -> None:
    self.send_response(status)
    self.send_header("Content-Type", ctype)
    if length is not None:
      self.send_header("Content-Length", str(length))
    self.send_header("X-Content-Type-Options", "nosniff")
    self.send_header("Referrer-Policy", "no-referrer")
    self.send_header("Cache-Control", "no-store")
    self.send_header("Content-Security-Policy", CSP)
    for k, v in (extra or {}).items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.app.count(status)

  def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None):
    self._headers(status, ctype, len(body), extra)
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
    text = json.dumps(obj, ensure_ascii=False)
    if not openai_api.encodable(text):  # an error quoting a lone surrogate: escape it
      text = json.dumps(obj)
    self._send(status, text.encode(), "application/json", extra)

  def _error(self, e: ApiError) -> None:
    self._json(e.status, e.body(), e.headers)

  def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
    """The base class's own errors (a bad request line, an unknown method) as JSON too."""
    self.close_connection = True
    try:
      self._error(ApiError(code, message or explain or "error", param=None))
    except OSError:
      pass

  # --- checks shared by every route ---

  def _check_host(self) -> None:
    host, port = self.server.server_address[:2]  # type: ignore[attr-defined]
    if not _is_loopback(str(host)):
      return
    bound = f"[{host}]" if ":" in str(host) else str(host)
    allowed = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]", bound)}
    if self.headers.get("Host", "").strip().lower() not in allowed:
      raise ApiError(
        403,
        f"Host {self.headers.get('Host')!r} is not this server's address "
        f"(a loopback server answers only to {sorted(allowed)})",
        type="permission_error",
      )

  def _check_key(self) -> None:
    key = self.app.api_key
    if not key:
      return
    given = self.headers.get("Authorization", "")
    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
      raise ApiError(
        401,
        "Missing or incorrect API key: send 'Authorization: Bearer KEY'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
      )

  def _body(self) -> Any:
    raw = self.read_body(self.app.max_body_bytes)
    ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
      raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    try:
      body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
      raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None
    bad = openai_api.surrogate_at(body)
    if bad is not None:
      raise ApiError(
        400,
        f"{bad[0]} holds a lone surrogate (such as \\ud800): text must be valid UTF-8",
        param=bad[1],
        code="invalid_text",
      )
    return body

  def _route(self, method: str) -> None:
    path = urllib.parse.urlsplit(self.path).path
    try:
      self.frame()
      self._check_host()
      if method in ("GET", "HEAD") and path in STATIC:
        name, ctype = STATIC[path]
        self.skip_body()
        data = resources.files("astrollama_jax.serve").joinpath("static", name).read_bytes()
        self._send(200, data, ctype, {"X-Frame-Options": "DENY"})
        return
      self._check_key()
      routes = {
        ("GET", "/v1/models"): self._models,
        ("GET", "/health"): self._health,
        ("GET", "/v1/feedback"): self._list_feedback,
        ("POST", "/v1/chat/completions"): lambda: self._complete("chat"),
        ("POST", "/v1/completions"): lambda: self._complete("completion"),
        ("POST", "/v1/feedback"): self._rate,
      }
      fn = routes.get(("GET" if method == "HEAD" else method, path))
      if fn is None:
        if any(p == path for _, p in routes):
          raise ApiError(405, f"{method} is not allowed on {path}")
        raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
      if method != "POST":
        self.skip_body()
      fn()
      self.skip_body()
    except ApiError as e:
      if e.status in (401, 403):  # a stranger's body: read no more than a request may hold
        self.skip_body(self.app.max_body_bytes, close=True)
      else:
        self.skip_body()
      self._error(e)
    except TimeoutError as e:  # the body dribbled in too slowly: say so, then hang up
      self.close_connection = True
      self.unread = 0
      try:
        self._error(ApiError(408, str(e), code="request_timeout"))
      except OSError:
        pass
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # noqa: BLE001 - a bug answers 500 and the server goes on
      logging.exception("internal error on %s %s", method, path)
      self.skip_body(self.app.max_body_bytes, close=True)
      self._error(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

  def do_GET(self) -> None:
    self._route("GET")

  def do_HEAD(self) -> None:
    self._route("HEAD")

  def do_POST(self) -> None:
    self._route("POST")

  def _not_allowed(self) -> None:
    self._route(self.command)

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

  # --- endpoints ---

  def _models(self) -> None:
    self._json(
      200,
      {
        "object": "list",
        "data": [
          {
            "id": self.app.model,
            "object": "model",
            "created": 0,
            "owned_by": "astrollama-jax",
            "context_length": self.app.max_seq_len,
          }
        ],
      },
    )

  def _health(self) -> None:
    self._json(200, {"status": "ok", "queued": self.app.batcher.pending()})

  def _complete(self, kind: str) -> None:
    body = self._body()
    app = self.app
    req = openai_api.parse(
      kind,
      body,
      model=app.model,
      tokenizer=app.tokenizer,
      max_seq_len=app.max_seq_len,
      default_max_tokens=app.default_max_tokens,
      chat_template=app.chat_template,
    )
    jobs = [Job(p, req.sampling) for p in req.prompts]
    if len(jobs) > app.batcher.max_queue:  # a 429 would invite a retry that can never succeed
      raise openai_api.bad(
        f"{len(jobs)} prompts in one request; this server queues at most {app.batcher.max_queue} "
        "(--max_queue)",
        "prompt",
      )
    try:
      app.batcher.submit(jobs)
    except QueueFull as e:
      raise ApiError(
        429,
        f"The server is busy ({e}); retry later",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
      ) from None
    except RuntimeError as e:
      raise ApiError(503, str(e), type="server_error") from None
    rid, created = openai_api.new_id(kind), openai_api.now()

    def remember(results: list[Any]) -> None:
      """Called before the answer's end is written: a rating sent on receipt must find it."""
      if kind == "chat":
        app.remember(
          rid,
          {
            "messages": req.messages,
            "answer": results[0].text,
            "sampling": req.sampling.as_dict(),
          },
        )

    try:
      if req.stream:
        self._stream(req, jobs, rid, created, remember)
      else:
        try:
          results = [job.wait() for job in jobs]
        except Exception as e:  # noqa: BLE001 - the model failed: a 500 for this request only
          raise ApiError(500, f"generation failed: {e}", type="server_error") from None
        remember(results)
        self._json(200, openai_api.response(req, rid, created, results))
    finally:
      for job in jobs:
        job.cancel()  # a no-op for finished jobs; frees the rows of a client that went away

  def _stream(self, req, jobs: list[Job], rid: str, created: int, on_done) -> None:
    """Server-sent events, as chunked HTTP. ``on_done(results)`` runs once every answer is in,
    before the last finish chunk is written (not at all if generation failed)."""
    self._headers(
      200,
      "text/event-stream; charset=utf-8",
      None,
      {"Transfer-Encoding": "chunked", "X-Accel-Buffering": "no"},
    )

    def send(obj: Any) -> None:
      data = (
        obj
        if isinstance(obj, bytes)
        else f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()
      )
      self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
      self.wfile.flush()

    results = []
    for i, job in enumerate(jobs):
      if req.kind == "chat":
        send(openai_api.chunk(req, rid, created, i, first=True))
      while True:
        kind, value = job.events.get()
        if kind == "delta":
          send(openai_api.chunk(req, rid, created, i, text=value))
          continue
        if kind == "error":
          send(ApiError(500, f"generation failed: {value}", type="server_error").body())
          send(b"data: [DONE]\n\n")
          self.wfile.write(b"0\r\n\r\n")
          return
        results.append(value)
        if len(results) == len(jobs):
          on_done(results)
        send(openai_api.chunk(req, rid, created, i, finish_reason=value.finish_reason))
        break
    if req.include_usage:
      send(openai_api.chunk(req, rid, created, None, usage_counts=openai_api.usage(req, results)))
    send(b"data: [DONE]\n\n")
    self.wfile.write(b"0\r\n\r\n")
    self.wfile.flush()

  def _store(self) -> FeedbackStore:
    if self.app.feedback is None:
      raise ApiError(
        404, "ratings are off: start the server with --feedback_db=PATH", code="feedback_off"
      )
    return self.app.feedback

  def _rate(self) -> None:
    body = self._body()
    store = self._store()
    if not isinstance(body, dict):
      raise openai_api.bad("the body must be a JSON object")
    allowed = {"completion_id", "rating", "correction", "tags", "comment"}
    if set(body) - allowed:
      raise openai_api.bad(f"unknown field(s): {', '.join(sorted(set(body) - allowed))}")
    record = self.app.recall(str(body.get("completion_id")))
    if record is None:
      raise ApiError(
        404,
        f"unknown completion_id {body.get('completion_id')!r}: only answers "
        f"given by this server run (its last {REMEMBERED_ANSWERS}) can be rated",
        param="completion_id",
        code="unknown_completion",
      )
    for name in ("correction", "comment"):
      if body.get(name) is not None and not isinstance(body[name], str):
        raise openai_api.bad(f"'{name}' must be a string", name)
    tags = body.get("tags") or []
    if not isinstance(tags, list):
      raise openai_api.bad("'tags' must be a list of strings", "tags")
    try:
      row = store.add(
        completion_id=body["completion_id"],
        checkpoint=self.app.checkpoint,
        model=self.app.model,
        messages=record["messages"],
        answer=record["answer"],
        rating=body.get("rating"),
        correction=body.get("correction"),
        tags=tags,
        sampling=record["sampling"],
        comment=body.get("comment"),
      )
    except RatingError as e:
      raise openai_api.bad(str(e), e.field) from None
    self._json(200, {"object": "feedback.rating", **row})

  def _list_feedback(self) -> None:
    store = self._store()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
    try:
      limit = int(query.get("limit", ["20"])[0])
    except ValueError:
      raise openai_api.bad("'limit' must be an integer", "limit") from None
    rows = store.rows(limit=max(1, min(limit, 200)), newest_first=True)
    self._json(200, {"object": "list", "data": rows})


class Server(BoundedServer):
  """The API on ``host:port``; ``BoundedServer``'s keywords bound its connections."""

  def __init__(self, app: App, host: str = "127.0.0.1", port: int = 8000, **limits: Any):
    self.app = app
    super().__init__((host, port), Handler, **limits)

  def refused(self) -> None:
    self.app.count(503)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
