"""The server against hostile clients: nothing smuggled in, nothing lost, every bad request one
clear 400-class answer, and a bounded number of connection threads whatever the clients do.

Raw sockets on 127.0.0.1 (and 127.0.0.2, also loopback) where a well-behaved client library
would hide the attack; every loop and every read is bounded in time.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time

from helpers_serve import NEW, client, post, running
import pytest
from test_serve import JSON, assert_error, folder, model, raw_request, req  # noqa: F401

from astrollama_jax.feedback.store import FeedbackStore
from astrollama_jax.serve.server import App, Server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):  # noqa: F811
  """One server with a ratings store, shared by the cases that need no special settings."""
  store = FeedbackStore(tmp_path_factory.mktemp("ratings") / "r.sqlite")
  with running(model, feedback=store) as (srv, batcher):
    yield srv, batcher
  store.close()


def ask(c, question="What is a quasar?", **kw):
  kw = {"temperature": 0, "max_tokens": NEW, **kw}
  return c.chat.completions.create(
    model="tiny-chat", messages=[{"role": "user", "content": question}], **kw
  )


def connect(srv, host="127.0.0.1", timeout=10.0) -> socket.socket:
  return socket.create_connection((host, srv.server_address[1]), timeout=timeout)


def read_all(sock: socket.socket, quiet_s: float = 1.0, limit_s: float = 15.0) -> bytes:
  """Everything the server sends until it closes, or is silent for ``quiet_s``."""
  data, end = b"", time.monotonic() + limit_s
  sock.settimeout(quiet_s)
  while time.monotonic() < end:
    try:
      got = sock.recv(65536)
    except (TimeoutError, ConnectionResetError):
      break
    if not got:
      break
    data += got
  return data


def statuses(data: bytes) -> list[int]:
  """The status of every response in ``data`` (a body need not end with a line break)."""
  return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


# --- a refused request's body is never run as a request ----------------------------------------


@pytest.mark.parametrize("guard", ["host", "api_key", "static_page"])
def test_a_refused_requests_body_is_not_run_as_a_second_request(model, guard):  # noqa: F811
  with running(model, start=False, api_key="k" if guard == "api_key" else None) as (srv, _):
    port = srv.server_address[1]
    smuggled = f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    method, path = ("GET", "/") if guard == "static_page" else ("POST", "/v1/chat/completions")
    host = "evil.example" if guard == "host" else f"127.0.0.1:{port}"
    head = (
      f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
      f"Content-Length: {len(smuggled)}\r\n\r\n"
    ).encode()
    with connect(srv) as sock:
      sock.sendall(head + smuggled)
      got = statuses(read_all(sock))
    want = {"host": [403], "api_key": [401], "static_page": [200]}[guard]
    assert got == want


# --- a rating sent right after the answer finds it ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_can_be_rated_as_soon_as_it_is_received(server, monkeypatch, stream):
  """The answer is remembered before its last byte is written: a slow ``remember`` only delays
  the response, it never lets a rating overtake it."""
  srv = server[0]
  original = srv.app.remember

  def slow(rid, record):
    time.sleep(0.5)
    original(rid, record)

  monkeypatch.setattr(srv.app, "remember", slow)
  c = client(srv)
  if stream:
    rid = [ch.id for ch in ask(c, stream=True)][-1]
  else:
    rid = ask(c).id
  got, payload = post(srv.url + "/v1/feedback", {"completion_id": rid, "rating": 4})
  assert got == 200, payload


# --- text that is not Unicode -------------------------------------------------------------------

NAME_SURROGATE = (
  b'{"model": "tiny-chat", "\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}'
)


def test_a_lone_surrogate_in_a_field_name_is_a_400(server):
  got, payload, _ = raw_request(server[0], "POST", "/v1/chat/completions", NAME_SURROGATE, JSON)
  assert_error(got, payload, 400, "UTF-8")


def test_a_lone_surrogate_in_stop_is_a_400_naming_stop(server):
  got, payload, _ = raw_request(server[0], "POST", "/v1/chat/completions", req(stop="\ud800"), JSON)
  assert_error(got, payload, 400, "stop", "UTF-8")
  assert payload["error"]["param"] == "stop"


@pytest.mark.parametrize("field", ["correction", "comment", "tags"])
def test_a_lone_surrogate_in_a_rating_is_a_400_naming_its_field(server, field):
  srv = server[0]
  rid = ask(client(srv), max_tokens=2).id
  value = ["\ud800"] if field == "tags" else "\ud800"
  got, payload = post(srv.url + "/v1/feedback", {"completion_id": rid, "rating": 3, field: value})
  assert_error(got, payload, 400, field, "UTF-8")
  assert payload["error"]["param"] == field and "codec" not in payload["error"]["message"]
  assert post(srv.url + "/v1/feedback", {"completion_id": rid, "rating": 3})[0] == 200


# --- shapes no request may have -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/feedback"])
def test_deeply_nested_json_is_a_400(server, path):
  got, payload, _ = raw_request(server[0], "POST", path, b"[" * 100_000, JSON)
  assert_error(got, payload, 400, "nested")


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_retry(model):  # noqa: F811
  with running(model, start=False, max_queue=2) as (srv, _):
    with pytest.raises(openai.BadRequestError) as e:
      client(srv).completions.create(model="tiny-chat", prompt=["a", "b", "c"], max_tokens=2)
    assert "max_queue" in str(e.value) and e.value.body["param"] == "prompt"


def test_a_server_on_another_loopback_address_answers_to_it(server):
  srv = Server(server[0].app, "127.0.0.2", 0)
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  try:
    conn = http.client.HTTPConnection("127.0.0.2", srv.server_address[1], timeout=30)
    conn.request("GET", "/v1/models")
    r = conn.getresponse()
    assert r.status == 200, r.read()
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.2", srv.server_address[1], timeout=30)
    conn.request("GET", "/v1/models", headers={"Host": "evil.example"})
    assert conn.getresponse().status == 403
    conn.close()
  finally:
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=30)


# --- framing ------------------------------------------------------------------------------------


def test_duplicate_content_length_headers_are_refused(server):
  body = req(model="gpt-9")
  head = (
    f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server[0].server_address[1]}\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    f"Content-Length: {len(body) + 40}\r\n\r\n"
  ).encode()
  with connect(server[0]) as sock:
    sock.sendall(head + body)
    data = read_all(sock)
  assert statuses(data) == [400] and b"Content-Length" in data


def test_a_body_shorter_than_its_content_length_is_refused(server):
  body = req(model="gpt-9")
  head = (
    f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server[0].server_address[1]}\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(body) + 10}\r\n\r\n"
  ).encode()
  with connect(server[0]) as sock:
    sock.sendall(head + body)
    sock.shutdown(socket.SHUT_WR)
    data = read_all(sock)
  assert statuses(data) == [400] and b"Content-Length" in data


def test_idle_and_dribbling_clients_hold_a_bounded_number_of_threads(model):  # noqa: F811
  """120 silent connections and 10 that send a byte every 0.1 s: the threads stay within the
  server's connection cap, the silent and slow ones are dropped after their timeouts, and a
  normal request is answered afterwards."""
  with running(model, start=False) as (srv, _):
    srv.idle_timeout, srv.request_timeout = 1.0, 1.5
    cap = getattr(srv, "max_connections", 64)
    before = threading.active_count()
    with contextlib.ExitStack() as stack:
      idle = [stack.enter_context(connect(srv)) for _ in range(120)]
      slow = [stack.enter_context(connect(srv)) for _ in range(10)]
      line = b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 200
      most, end, sent = 0, time.monotonic() + 4.0, 0
      while time.monotonic() < end:
        for s in slow:
          with contextlib.suppress(OSError):
            s.send(line[sent % len(line) : sent % len(line) + 1])
        sent += 1
        most = max(most, threading.active_count() - before)
        time.sleep(0.1)
      assert most <= cap + 2, f"{most} threads for {len(idle) + len(slow)} connections"
      for s in idle + slow:  # every one was answered 503 or dropped: the server closed it
        data = read_all(s, quiet_s=3.0, limit_s=3.0)
        assert statuses(data) in ([], [503], [408]), data[:200]
        s.settimeout(0.5)
        with contextlib.suppress(ConnectionResetError):
          assert s.recv(1) == b""
    assert raw_request(srv, "GET", "/v1/models")[0] == 200
    for _ in range(50):  # the handler threads end once their connections are closed
      if threading.active_count() <= before:
        break
      time.sleep(0.1)
    assert threading.active_count() <= before


def test_the_connection_cap_answers_503_and_frees_up(server, model):  # noqa: F811
  """Past the cap a new connection gets a 503 at once rather than a thread."""
  app: App = server[0].app
  srv = Server(app, "127.0.0.1", 0, max_connections=2)
  srv.idle_timeout = 30.0
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  try:
    with connect(srv), connect(srv):
      time.sleep(0.3)
      with connect(srv) as c:
        c.sendall(
          f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{srv.server_address[1]}\r\n\r\n".encode()
        )
        assert statuses(read_all(c)) == [503]
    for _ in range(50):
      if raw_request(srv, "GET", "/v1/models")[0] == 200:
        break
      time.sleep(0.1)
    assert raw_request(srv, "GET", "/v1/models")[0] == 200
  finally:
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=30)
