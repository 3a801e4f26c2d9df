"""make_qa against a chat-completions server of our own on 127.0.0.1 that misbehaves on request.

Each abstract carries a ``BEHAVIOR:<name>`` marker; the server reads it from the prompt and answers
well, badly, slowly or with HTTP errors. Backoff sleeps are recorded instead of slept.
"""

import http.server
import json
import os
from pathlib import Path
import subprocess
import sys
import threading
import time

import pytest

from astrollama_jax.data import qa_dialogues
from astrollama_jax.data.chat_formats import load_conversations

GOOD_DIALOGUE = {
  "dialogue": [
    {"role": "user", "content": "What sets the size of a protoplanetary disc?"},
    {
      "role": "assistant",
      "content": "Mostly the angular momentum of the infalling core and later viscous spreading.",
    },
    {"role": "user", "content": "And what removes the gas in the end?"},
    {
      "role": "assistant",
      "content": "Photoevaporation by the star's high-energy radiation, helped by winds.",
    },
  ]
}

# behavior -> list of replies per successive request; the last entry repeats.
# A reply is ("json", content_string) | ("status", code, headers) | ("sleep", seconds)
SCRIPTS = {
  "good": [("json", json.dumps(GOOD_DIALOGUE))],
  "fenced": [("json", "```json\n" + json.dumps(GOOD_DIALOGUE) + "\n```")],
  "notjson": [("json", "Sure! Here is a lovely dialogue about discs: ...")],
  "wrongshape": [
    (
      "json",
      json.dumps(
        {"dialogue": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}
      ),
    )
  ],
  "emptyturn": [
    (
      "json",
      json.dumps(
        {"dialogue": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "  "}]}
      ),
    )
  ],
  "odd": [("json", json.dumps({"dialogue": GOOD_DIALOGUE["dialogue"][:3]}))],
  "badbody": [("raw", b"<html>gateway</html>")],
  "slow": [("sleep", 2.0)],
  "ratelimited": [("status", 429, {"Retry-After": "7"}), ("json", json.dumps(GOOD_DIALOGUE))],
  "flaky": [("status", 500, {}), ("status", 502, {}), ("json", json.dumps(GOOD_DIALOGUE))],
  "down": [("status", 503, {})],
  "forbidden": [("status", 403, {})],
  # hostile servers
  "redirect_away": [("redirect", "other")],
  "redirect_here": [("redirect", "self"), ("json", json.dumps(GOOD_DIALOGUE))],
  "drip": [("drip", 0.25)],
  "huge": [("raw", b'{"pad": "' + b"x" * (3 * 1024**2) + b'"}')],
  "deep_body": [("raw", b"[" * 200_000 + b"]" * 200_000)],
  "deep_content": [("json", "[" * 200_000 + "]" * 200_000)],
}
REDIRECT_TARGET: dict[str, str] = {}


class _Server:
  """ThreadingHTTPServer whose handler follows SCRIPTS; counts hits and peak concurrency."""

  def __init__(self, delay: float = 0.0):
    self.hits: dict[str, int] = {}
    self.inflight = 0
    self.peak = 0
    self.delay = delay
    self.paths: list[str] = []
    self.auth: set = set()
    lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        behavior = prompt.split("BEHAVIOR:", 1)[1].split()[0]
        paper = prompt.split("PAPER:", 1)[1].split()[0]
        with lock:
          outer.paths.append(self.path)
          outer.auth.add(self.headers.get("Authorization"))
          n = outer.hits.get(paper, 0)
          outer.hits[paper] = n + 1
          outer.inflight += 1
          outer.peak = max(outer.peak, outer.inflight)
          counted = True
        try:
          time.sleep(outer.delay)
          script = SCRIPTS[behavior]
          step = script[min(n, len(script) - 1)]
          if step[0] == "sleep":
            time.sleep(step[1])
            step = ("json", json.dumps(GOOD_DIALOGUE))
          if step[0] == "status":
            self.send_response(step[1])
            for k, v in step[2].items():
              self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
          if step[0] == "redirect":
            self.send_response(302)
            target = outer.url if step[1] == "self" else REDIRECT_TARGET["other"]
            self.send_header("Location", target + "/v1/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
          if step[0] == "drip":  # headers at once, then one byte of body every step[1] seconds
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
              for _ in range(100000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(step[1])
            except (BrokenPipeError, ConnectionResetError):
              pass
            return
          if step[0] == "raw":
            payload = step[1]
          else:
            payload = json.dumps(
              {"choices": [{"message": {"role": "assistant", "content": step[1]}}]}
            ).encode()
          with lock:  # done before the client can see the answer and send its next request
            outer.inflight -= 1
            counted = False
          self.send_response(200)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          try:
            self.wfile.write(payload)
          except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
          with lock:
            outer.inflight -= counted

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _write_abstracts(path: Path, behaviors: list[str]) -> list[str]:
  ids = []
  with open(path, "w") as f:
    for i, b in enumerate(behaviors):
      pid = f"2501.{i:05d}"
      ids.append(pid)
      f.write(
        json.dumps(
          {
            "id": pid,
            "title": f"Paper {i}",
            "abstract": f"We study discs. PAPER:{pid} BEHAVIOR:{b} end.",
          }
        )
        + "\n"
      )
  return ids


def _settings(url: str, **kw) -> qa_dialogues.Settings:
  base = dict(
    endpoint=url,
    model="test-model",
    concurrency=4,
    max_retries=2,
    timeout=5.0,
    backoff_base=0.001,
    backoff_max=10.0,
  )
  base.update(kw)
  return qa_dialogues.Settings(**base)


def _lines(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_completions_url():
  assert qa_dialogues.chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
  assert qa_dialogues.chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
  assert (
    qa_dialogues.chat_completions_url("http://h/x/chat/completions")
    == "http://h/x/chat/completions"
  )


@pytest.mark.parametrize(
  "content,reason",
  [
    ("", "empty reply"),
    ("not json", "reply is not JSON"),
    ('{"dialog": []}', "reply has no dialogue list"),
    ('{"dialogue": [1, 2]}', "turn is not {role, content}"),
    (
      '{"dialogue": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
      "empty turn",
    ),
    (
      '{"dialogue": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}',
      "roles do not alternate from user",
    ),
    ('{"dialogue": [{"role": "user", "content": "q"}]}', "dialogue ends without an answer"),
  ],
)
def test_parse_dialogue_rejects(content, reason):
  with pytest.raises(qa_dialogues.ReplyError) as e:
    qa_dialogues.parse_dialogue(content)
  assert e.value.reason == reason


def test_parse_dialogue_accepts_bare_list_and_fences():
  turns = qa_dialogues.parse_dialogue("```json\n" + json.dumps(GOOD_DIALOGUE["dialogue"]) + "\n```")
  assert [r for r, _ in turns] == ["user", "assistant"] * 2
  assert turns[1][1].startswith("Mostly the angular momentum")


def test_retry_after_parsing():
  assert qa_dialogues._retry_after("3") == 3.0
  assert qa_dialogues._retry_after(None) is None
  assert qa_dialogues._retry_after("soon") is None
  future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
  assert 90 < qa_dialogues._retry_after(future) <= 100


def test_every_behaviour_and_resume(tmp_path):
  behaviors = [
    "good",
    "fenced",
    "notjson",
    "wrongshape",
    "emptyturn",
    "odd",
    "badbody",
    "ratelimited",
    "flaky",
    "down",
    "forbidden",
    "good",
  ]
  abstracts = tmp_path / "abstracts.jsonl"
  ids = _write_abstracts(abstracts, behaviors)
  out = tmp_path / "out" / "qa.jsonl"
  slept = []
  with _Server() as server:
    summary = qa_dialogues.run(str(abstracts), str(out), _settings(server.url), sleep=slept.append)
    by_id = dict(zip(ids, behaviors))
    assert set(server.paths) == {"/v1/chat/completions"}
    assert server.auth == {None}
    assert summary["done"] == 5  # good x2, fenced, ratelimited, flaky
    assert summary["skipped_existing"] == 0
    assert summary["failed"] == {
      "reply is not JSON": 1,
      "roles do not alternate from user": 1,
      "empty turn": 1,
      "dialogue ends without an answer": 1,
      "response body is not JSON": 1,
      "http 503": 1,
      "http 403": 1,
    }
    written = {r["id"] for r in _lines(out)}
    assert written == {i for i in ids if by_id[i] in ("good", "fenced", "ratelimited", "flaky")}
    # retries: max_retries=2 -> 3 attempts for transient errors, 1 for a 403 or a bad reply
    hits = {by_id[i]: n for i, n in server.hits.items()}
    assert hits["down"] == 3 and hits["badbody"] == 3 and hits["flaky"] == 3
    assert hits["forbidden"] == 1 and hits["notjson"] == 1 and hits["ratelimited"] == 2
    assert 7.0 in slept  # Retry-After honoured
    assert all(d <= 0.004 for d in slept if d != 7.0)  # jittered backoff under base * 2**attempt

    rec = next(r for r in _lines(out) if by_id[r["id"]] == "ratelimited")
    assert rec["source_id"] == rec["id"] and rec["model"] == "test-model"
    assert [t["from"] for t in rec["conversations"]] == ["human", "gpt", "human", "gpt"]

    # A crash mid-write leaves a cut line: the rerun drops it and redoes only unfinished ids.
    with open(out, "a") as f:
      f.write('{"id": "2501.00002", "conversations": [{"from": "hum')
    before = dict(server.hits)
    summary2 = qa_dialogues.run(str(abstracts), str(out), _settings(server.url), sleep=slept.append)
    assert summary2["skipped_existing"] == 5 and summary2["done"] == 0
    again = {i for i in server.hits if server.hits[i] > before.get(i, 0)}
    assert again == {i for i in ids if i not in written}
  lines = _lines(out)  # every line parses
  assert len(lines) == len({r["id"] for r in lines}) == 5
  convs, report = load_conversations(out)
  assert report == {"ok": 5} and {c.id for c in convs} == written


def test_timeout_is_retried_then_fails(tmp_path):
  abstracts = tmp_path / "a.jsonl"
  ids = _write_abstracts(abstracts, ["slow"])
  out = tmp_path / "qa.jsonl"
  with _Server() as server:
    summary = qa_dialogues.run(
      str(abstracts),
      str(out),
      _settings(server.url, timeout=0.2, max_retries=1),
      sleep=lambda s: None,
    )
    assert server.hits[ids[0]] == 2
  assert summary["failed"] == {"timeout": 1} and summary["done"] == 0
  assert out.read_text() == ""


def test_concurrency_is_bounded(tmp_path):
  abstracts = tmp_path / "a.jsonl"
  _write_abstracts(abstracts, ["good"] * 12)
  with _Server(delay=0.05) as server:
    summary = qa_dialogues.run(
      str(abstracts), str(tmp_path / "qa.jsonl"), _settings(server.url, concurrency=3)
    )
    assert summary["done"] == 12
    assert 1 <= server.peak <= 3


def test_bad_abstract_lines_are_counted(tmp_path):
  abstracts = tmp_path / "a.jsonl"
  _write_abstracts(abstracts, ["good", "good"])
  with open(abstracts, "a") as f:
    f.write("{broken\n" + json.dumps({"id": "x", "title": "t"}) + "\n")
    f.write(
      json.dumps({"id": "2501.00000", "title": "dup", "abstract": "PAPER:dup BEHAVIOR:good"}) + "\n"
    )
  with _Server() as server:
    summary = qa_dialogues.run(
      str(abstracts), str(tmp_path / "qa.jsonl"), _settings(server.url), limit=4
    )
  assert summary["done"] == 2 and summary["bad_input"] == {"bad abstract record": 2}


def test_cli(tmp_path):
  abstracts = tmp_path / "a.jsonl"
  _write_abstracts(abstracts, ["good", "notjson", "good"])
  out = tmp_path / "qa.jsonl"
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  env["QA_TEST_KEY"] = "sekrit"
  with _Server() as server:
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "astrollama_jax",
        "make_qa",
        f"--abstracts={abstracts}",
        f"--output={out}",
        f"--endpoint={server.url}/v1",
        "--model=m",
        "--api_key_env=QA_TEST_KEY",
        "--limit=2",
        "--concurrency=2",
        "--backoff_base=0.001",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=60,
      check=False,
    )
    assert server.auth == {"Bearer sekrit"}
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["done"] == 1 and summary["failed"] == {"reply is not JSON": 1}
  assert [r["id"] for r in _lines(out)] == ["2501.00000"]


def test_hostile_servers_fail_one_abstract_each_and_keep_the_rest(tmp_path):
  """Cross-origin redirects are refused (the key never leaves the endpoint), the deadline bounds
  a dripping reply, a huge or deeply nested reply fails its abstract, and the good ones are kept."""
  abstracts = tmp_path / "a.jsonl"
  kinds = [
    "good",
    "redirect_away",
    "redirect_here",
    "drip",
    "huge",
    "deep_body",
    "deep_content",
    "good",
  ]
  ids = _write_abstracts(abstracts, kinds)
  out = tmp_path / "qa.jsonl"
  with _Server() as server, _Server() as other:
    REDIRECT_TARGET["other"] = other.url
    t0 = time.monotonic()
    summary = qa_dialogues.run(
      str(abstracts),
      str(out),
      _settings(
        server.url,
        api_key="sekrit",
        timeout=1.5,
        max_retries=0,
        concurrency=8,
        max_reply_bytes=1024**2,
      ),
      sleep=lambda s: None,
    )
    elapsed = time.monotonic() - t0
    assert other.hits == {} and other.auth == set()  # nothing, let alone the key, reached it
  assert elapsed < 20
  port = other.url.rsplit(":", 1)[1]
  assert summary["failed"] == {
    f"redirect to another origin refused (http://127.0.0.1:{port})": 1,
    "timeout": 1,
    f"reply larger than {1024**2} bytes": 1,
    "response body is nested too deeply": 1,
    "reply is nested too deeply": 1,
  }
  assert summary["done"] == 3
  assert sorted(r["id"] for r in _lines(out)) == sorted([ids[0], ids[2], ids[7]])
