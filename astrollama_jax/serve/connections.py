"""Connections that cannot pile up or be misread: a cap on the threads, clocks on every
request, and one way only to tell where a request's body ends.

``http.server.ThreadingHTTPServer`` starts one thread per connection and waits on a silent
client for as long as the socket timeout allows between any two bytes, so idle or dribbling
clients could hold any number of threads. Here at most ``max_connections`` connections hold a
thread (one more is answered 503 at once and closed), a kept-alive connection silent for
``idle_timeout`` is closed, and a request must arrive whole within ``request_timeout`` of its
first byte, however the bytes are spread out.

A body is framed by one ``Content-Length`` (no chunked bodies, no second length) and must be as
long as it says; a body the handler does not use (a refused request, a GET) is read and dropped
or the connection closed, so its bytes are never parsed as a request of their own.
"""

from __future__ import annotations

import http.server
import io
import json
import re
import socket
import threading
import time
from typing import Any

from astrollama_jax.serve.openai_api import ApiError

DISCARD_LIMIT = 16 << 20  # an unused body is read and dropped up to this size, else we hang up
MAX_CONNECTIONS = 64  # connections served at once (each holds a thread)
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request
REQUEST_TIMEOUT = 60.0  # seconds from a request's first byte to its last


class TimedReader(io.RawIOBase):
  """A connection's read side with two clocks: ``idle_s`` for the first byte of a request and
  ``request_s`` from then to its last (checked before every ``recv``, so a client sending one
  byte at a time cannot stretch it). Writes keep the socket's ``write_s`` timeout."""

  def __init__(self, sock: socket.socket, idle_s: float, request_s: float, write_s: float):
    self.sock, self.idle_s, self.request_s, self.write_s = sock, idle_s, request_s, write_s
    self.deadline: float | None = None  # None: waiting for a request to begin

  def next_request(self) -> None:
    self.deadline = None

  def readable(self) -> bool:
    return True

  def readinto(self, buffer: Any) -> int:
    if self.deadline is None:
      timeout = self.idle_s
    else:
      timeout = self.deadline - time.monotonic()
      if timeout <= 0:
        raise TimeoutError(f"the request did not arrive whole within {self.request_s:g} s")
    self.sock.settimeout(timeout)
    try:
      n = self.sock.recv_into(buffer)
    finally:
      self.sock.settimeout(self.write_s)
    if self.deadline is None:
      self.deadline = time.monotonic() + self.request_s
    return n


class TimedHandler(http.server.BaseHTTPRequestHandler):
  """Reads through a ``TimedReader`` with the server's clocks (``timeout`` bounds each write),
  and frames bodies: ``frame()`` first, then ``read_body()`` or ``skip_body()``."""

  timeout = 120
  unread = 0  # bytes of the current request's body not read yet

  def setup(self) -> None:
    super().setup()
    self.rfile.close()  # the plain reader, replaced by one that keeps time
    self._reader = TimedReader(
      self.connection,
      self.server.idle_timeout,  # type: ignore[attr-defined]
      self.server.request_timeout,  # type: ignore[attr-defined]
      self.timeout,
    )
    self.rfile = io.BufferedReader(self._reader)

  def handle_one_request(self) -> None:
    self._reader.next_request()
    self.unread = 0
    super().handle_one_request()

  def frame(self) -> None:
    """Set ``unread`` from the one ``Content-Length`` (0 without one). What two HTTP parsers
    could read differently is refused and the connection closed: the bytes after it cannot be
    trusted to start a request."""
    if self.headers.get("Transfer-Encoding"):
      self.close_connection = True
      raise ApiError(411, "send the body with a Content-Length (no chunked request bodies)")
    values = self.headers.get_all("Content-Length") or []
    if len(values) > 1:
      self.close_connection = True
      raise ApiError(400, f"{len(values)} Content-Length headers; send one", code="invalid_framing")
    if values and not re.fullmatch(r"\d{1,18}", values[0].strip()):
      self.close_connection = True
      raise ApiError(400, f"Content-Length {values[0]!r} is not a length", code="invalid_framing")
    self.unread = int(values[0]) if values else 0

  def read_body(self, limit: int) -> bytes:
    """The whole body (411 without a length, 413 past ``limit``, 400 if it ends short)."""
    if self.headers.get("Content-Length") is None:
      self.close_connection = True
      raise ApiError(411, "a POST needs a Content-Length header")
    length = self.unread
    if length > limit:
      raise ApiError(
        413,
        f"request body of {length} bytes; the limit is {limit} bytes",
        code="request_too_large",
      )
    raw, self.unread = self.rfile.read(length), 0
    if len(raw) < length:
      self.close_connection = True
      raise ApiError(
        400,
        f"the body ended after {len(raw)} of the {length} bytes its Content-Length announced",
        code="invalid_framing",
      )
    return raw

  def skip_body(self, limit: int = DISCARD_LIMIT, close: bool = False) -> None:
    """Read and drop the unread body, up to ``limit`` bytes; a longer one closes the connection
    unread (closing with data unread may reset it before the client reads our answer, hence
    the read). ``close``: hang up after this request anyway."""
    length, self.unread = self.unread, 0
    if close or length > limit:
      self.close_connection = True
    if length > limit:
      return
    while length > 0:
      got = self.rfile.read(min(length, 1 << 16))
      if not got:
        self.close_connection = True
        break
      length -= len(got)


class BoundedServer(http.server.ThreadingHTTPServer):
  """A threading server with at most ``max_connections`` connection threads.

  ``idle_timeout`` and ``request_timeout`` are read as each connection starts, so they may be
  changed on a running server. ``refused()`` is called for each connection turned away.
  """

  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 64

  def __init__(
    self,
    address: tuple[Any, ...],
    handler: type[TimedHandler],
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
  ):
    if max_connections < 1 or idle_timeout <= 0 or request_timeout <= 0:
      raise ValueError("max_connections, idle_timeout and request_timeout must be positive")
    self.max_connections, self.idle_timeout = max_connections, idle_timeout
    self.request_timeout = request_timeout
    self._slots = threading.BoundedSemaphore(max_connections)
    if ":" in str(address[0]):
      self.address_family = socket.AF_INET6
    super().__init__(address, handler)

  def process_request(self, request: Any, client_address: Any) -> None:
    """A thread for the connection if a slot is free, else a 503 written at once from the
    accepting thread (a new socket's send buffer takes it without waiting)."""
    if not self._slots.acquire(blocking=False):
      self._refuse(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request: Any, client_address: Any) -> None:
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def refused(self) -> None:
    """Hook: a connection was turned away with a 503."""

  def _refuse(self, request: socket.socket) -> None:
    error = {
      "message": f"the server holds its limit of {self.max_connections} connections; retry shortly",
      "type": "server_error",
      "param": None,
      "code": "too_many_connections",
    }
    body = json.dumps({"error": error}).encode()
    head = (
      "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
      f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
      request.settimeout(1.0)
      request.sendall(head + body)
    except OSError:
      pass
    self.refused()
    self.shutdown_request(request)
