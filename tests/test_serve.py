"""The OpenAI-compatible server, through the official ``openai`` client on 127.0.0.1.

Greedy answers are checked against transformers' ``generate`` on ``apply_chat_template`` of the
same exported folder; concurrency is checked to change no answer; every error path answers a
4xx with OpenAI's error body and leaves the server serving.
"""

from __future__ import annotations

import http.client
import json
import os
import threading

from helpers import free_port
from helpers_serve import NEW, client, load, make_chat_hf_folder, running, start_cli, wait_ready
import pytest
import torch

from astrollama_jax.generation import generate

openai = pytest.importorskip("openai")

SYSTEM = "You are an astronomer. Answer briefly."
QUESTIONS = [
  "What is a quasar?",
  "Why is the sky dark at night?",
  "What is a blazar?",
  "How old is the Universe?",
  "What is dark matter?",
  "Define a parsec.",
  "What powers the Sun?",
  "What is redshift?",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_path):
  path = tmp_path_factory.mktemp("tiny_chat")
  return path, make_chat_hf_folder(path, tokenizer_path)


@pytest.fixture(scope="module")
def model(folder):
  return load(folder[0])


@pytest.fixture(scope="module")
def server(model):
  with running(model) as (srv, batcher):
    yield srv, batcher


def messages(question, system=SYSTEM):
  return ([{"role": "system", "content": system}] if system else []) + [
    {"role": "user", "content": question}
  ]


def chat(c, question, **kw):
  kw = {"temperature": 0, "max_tokens": NEW, **kw}
  return c.chat.completions.create(model="tiny-chat", messages=messages(question), **kw)


def hf_chat_greedy(folder, msgs, n):
  """transformers' tokenizer (apply_chat_template) and greedy generate: (prompt ids, new ids)."""
  import transformers

  path, model = folder
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  ids = tok.apply_chat_template(msgs, tokenize=True)
  ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
  with torch.no_grad():
    out = model.generate(
      torch.as_tensor([ids]),
      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
      do_sample=False,
      max_new_tokens=n,
      pad_token_id=0,
      eos_token_id=2,
    )
  new = out[0, len(ids) :].tolist()
  return tok, ids, new[: new.index(2)] if 2 in new else new


def test_models_lists_the_one_model_with_its_context(server):
  models = client(server[0]).models.list().data
  assert [m.id for m in models] == ["tiny-chat"] and models[0].context_length == 512


def test_greedy_chat_equals_transformers_on_the_chat_template(server, folder):
  c = client(server[0])
  for question in QUESTIONS[:2]:
    got = chat(c, question)
    tok, ids, new = hf_chat_greedy(folder, messages(question), NEW)
    assert got.choices[0].message.content == tok.decode(new, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(new)
    assert got.usage.total_tokens == len(ids) + len(new)
    assert got.choices[0].finish_reason == ("length" if len(new) == NEW else "stop")
    assert got.choices[0].message.role == "assistant" and got.id.startswith("chatcmpl-")


def test_streamed_deltas_join_to_the_whole_answer(server):
  c = client(server[0])
  whole = chat(c, QUESTIONS[0])
  chunks = list(chat(c, QUESTIONS[0], stream=True, stream_options={"include_usage": True}))
  deltas = [
    ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content
  ]
  assert len(deltas) > 1, "the answer should arrive in several pieces"
  assert "".join(deltas) == whole.choices[0].message.content
  assert chunks[0].choices[0].delta.role == "assistant"
  reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
  assert reasons[-1] == whole.choices[0].finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
  assert len({ch.id for ch in chunks}) == 1


def test_completions_endpoint_equals_generate_and_streams(server, model):
  loaded, tok, _ = model
  c = client(server[0])
  prompts = ["The Hubble constant is", "Dark matter halos are"]
  got = c.completions.create(model="tiny-chat", prompt=prompts, temperature=0, max_tokens=NEW)
  ref = generate(loaded.cfg, loaded.params, [tok.encode(p) for p in prompts], NEW, tokenizer=tok)
  assert [ch.text for ch in got.choices] == ref.texts
  assert [ch.index for ch in got.choices] == [0, 1]
  assert got.usage.completion_tokens == ref.num_generated
  assert got.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
  streamed = {}
  for ch in c.completions.create(
    model="tiny-chat", prompt=prompts, temperature=0, max_tokens=NEW, stream=True
  ):
    for choice in ch.choices:
      streamed[choice.index] = streamed.get(choice.index, "") + choice.text
  assert [streamed[0], streamed[1]] == ref.texts


def test_stop_strings_and_max_tokens_cut_the_answer(server, model):
  c = client(server[0])
  full = chat(c, QUESTIONS[3]).choices[0].message.content
  stop = full[len(full) // 2 : len(full) // 2 + 3]
  cut = chat(c, QUESTIONS[3], stop=[stop, "never in the answer §"])
  assert cut.choices[0].message.content == full[: full.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  assert 0 < cut.usage.completion_tokens < NEW
  streamed = "".join(
    ch.choices[0].delta.content or ""
    for ch in chat(c, QUESTIONS[3], stop=stop, stream=True)
    if ch.choices
  )
  assert streamed == full[: full.index(stop)]
  short = chat(c, QUESTIONS[3], max_tokens=3)
  assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
  assert full.startswith(short.choices[0].message.content)


def test_eight_concurrent_clients_get_their_answers_alone_in_one_call(model):
  """Greedy answers alone (one request per call), then all eight queued together: one call."""
  with running(model, start=False) as (srv, batcher):
    c = client(srv)
    batcher.start()
    alone = [chat(c, q).choices[0].message.content for q in QUESTIONS]
    seeded = chat(c, QUESTIONS[0], temperature=0.9, seed=1234).choices[0].message.content
    calls = batcher.stats["calls"]
  with running(model, start=False) as (srv, batcher):
    c = client(srv)
    answers = [None] * 9

    def ask(i):
      if i < 8:
        answers[i] = chat(c, QUESTIONS[i]).choices[0].message.content
      else:
        answers[i] = chat(c, QUESTIONS[0], temperature=0.9, seed=1234).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(9)]
    for t in threads:
      t.start()
    for _ in range(600):  # all nine waiting in the queue before the worker starts
      if batcher.pending() == 9:
        break
      threading.Event().wait(0.05)
    assert batcher.pending() == 9
    batcher.start()
    for t in threads:
      t.join(timeout=300)
    assert answers[:8] == alone and answers[8] == seeded
    assert calls == 9 and batcher.stats["calls"] == 2  # the eight greedy ones shared one call
  assert len(set(alone)) == 8


def test_seeded_sampling_is_reproducible_and_seeds_differ(server):
  c = client(server[0])
  a, b, other = (
    chat(c, QUESTIONS[1], temperature=1.0, top_p=0.95, seed=s).choices[0].message.content
    for s in (7, 7, 8)
  )
  assert a == b and a != other


# --- errors ------------------------------------------------------------------------------------


def raw_request(srv, method, path, body=b"", headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
  conn.request(method, path, body=body, headers=headers or {})
  r = conn.getresponse()
  data = r.read()
  conn.close()
  is_json = (r.getheader("Content-Type") or "").startswith("application/json")
  return r.status, json.loads(data) if is_json else data, dict(r.getheaders())


def assert_error(status, body, want_status, *words):
  assert status == want_status, body
  assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
  for w in words:
    assert w in body["error"]["message"], body


JSON = {"Content-Type": "application/json"}


HI = [{"role": "user", "content": "hi"}]


def req(msgs=HI, **fields) -> bytes:
  return json.dumps({"model": "tiny-chat", "messages": msgs, **fields}).encode()


@pytest.mark.parametrize(
  "body,status,words",
  [
    (b"{not json", 400, ["not valid JSON"]),
    (b"[1, 2]", 400, ["JSON object"]),
    (json.dumps({"model": "tiny-chat"}).encode(), 400, ["messages"]),
    (req(model="gpt-9"), 404, ["gpt-9"]),
    (req(temperature="hot"), 400, ["temperature"]),
    (req(temperature=5), 400, ["temperature", "[0.0, 2.0]"]),
    (req(max_tokens=0), 400, ["max_tokens"]),
    (req(n=2), 400, ["n=1"]),
    (req(tools=[]), 400, ["tools"]),
    (req([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400, ["alternate"]),
    (
      req([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
      400,
      ["end with a user message"],
    ),
    (req([{"role": "wizard", "content": "a"}]), 400, ["wizard"]),
    (req([{"role": "user", "content": 3}]), 400, ["content"]),
    (req([{"role": "user", "content": "\ud800"}]), 400, ["UTF-8"]),
    (req(stop=[""]), 400, ["stop"]),
    (req(stream="yes"), 400, ["stream"]),
  ],
)
def test_malformed_requests_get_a_4xx_with_an_openai_error(server, body, status, words):
  srv = server[0]
  got, payload, _ = raw_request(srv, "POST", "/v1/chat/completions", body, JSON)
  assert_error(got, payload, status, *words)
  assert chat(client(srv), "still there?").choices[0].message.content  # the server goes on


def test_too_long_requests_name_the_context_limit(server):
  c = client(server[0])
  long = "galaxy " * 600
  for call in (
    lambda: chat(c, long),
    lambda: chat(c, "hi", max_tokens=600),
    lambda: c.completions.create(model="tiny-chat", prompt=long, max_tokens=4),
  ):
    with pytest.raises(openai.BadRequestError) as e:
      call()
    assert "maximum context length is 512 tokens" in str(e.value)
    assert e.value.body["code"] == "context_length_exceeded"
  assert chat(c, "hi").choices[0].finish_reason in ("stop", "length")


def test_http_level_errors_and_the_server_goes_on(server):
  srv = server[0]
  path = "/v1/chat/completions"
  assert_error(
    *raw_request(srv, "POST", path, req(), {"Content-Type": "text/plain"})[:2],
    415,
    "application/json",
  )
  assert_error(*raw_request(srv, "POST", path, b"x" * (2 << 20), JSON)[:2], 413, "limit")
  assert_error(*raw_request(srv, "GET", "/v1/chat/completions")[:2], 405)
  assert_error(*raw_request(srv, "DELETE", "/v1/models")[:2], 405)
  assert_error(*raw_request(srv, "GET", "/v2/nothing")[:2], 404)
  assert_error(
    *raw_request(srv, "GET", "/v1/models", headers={"Host": "evil.example:80"})[:2], 403, "Host"
  )
  status, _, headers = raw_request(srv, "GET", "/")
  assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
  assert chat(client(srv), "hi").choices[0].message.content


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server):
  srv = server[0]
  conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
  body = {
    "model": "tiny-chat",
    "messages": messages(QUESTIONS[2]),
    "stream": True,
    "max_tokens": NEW,
  }
  conn.request("POST", "/v1/chat/completions", json.dumps(body), JSON)
  r = conn.getresponse()
  assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
  r.fp.readline()
  conn.sock.close()
  conn.close()
  assert chat(client(srv), QUESTIONS[2]).choices[0].message.content


def test_a_full_queue_answers_429_then_serves_again(model):
  with running(model, start=False, max_queue=2) as (srv, batcher):
    c = client(srv)
    done = []
    threads = [threading.Thread(target=lambda q=q: done.append(chat(c, q))) for q in QUESTIONS[:2]]
    for t in threads:
      t.start()
    for _ in range(600):
      if batcher.pending() == 2:
        break
      threading.Event().wait(0.05)
    with pytest.raises(openai.RateLimitError) as e:
      chat(c, QUESTIONS[2])
    assert e.value.response.headers["Retry-After"] == "1" and "busy" in str(e.value)
    batcher.start()
    for t in threads:
      t.join(timeout=300)
    assert len(done) == 2
    assert chat(c, QUESTIONS[2]).choices[0].message.content


def test_the_api_key_guards_every_endpoint(model):
  with running(model, api_key="s3cret") as (srv, _):
    for bad in (client(srv), client(srv, api_key="wrong")):
      with pytest.raises(openai.AuthenticationError):
        bad.models.list()
      with pytest.raises(openai.AuthenticationError):
        chat(bad, "hi")
    for path in ("/v1/feedback", "/health"):
      assert raw_request(srv, "GET", path)[0] == 401
    good = client(srv, api_key="s3cret")
    assert good.models.list().data[0].id == "tiny-chat"
    assert chat(good, "hi").choices[0].message.content


def test_command_line_binds_loopback_and_answers_like_in_process(folder, model, tmp_path):
  import psutil

  port = free_port()
  proc = start_cli(
    f"--checkpoint={folder[0]}",
    f"--port={port}",
    "--compute_dtype=float32",
    "--api_key_env=TEST_SERVE_KEY",
    f"--max_tokens={NEW}",
    log_path=tmp_path / "log",
    env_extra={"TEST_SERVE_KEY": "k"},
  )
  try:
    wait_ready(f"http://127.0.0.1:{port}/health", proc, {"Authorization": "Bearer k"})
    listening = [
      c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    import openai as o

    c = o.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    name = os.path.basename(str(folder[0]))
    got = c.chat.completions.create(model=name, messages=messages(QUESTIONS[0]), temperature=0)
    with running(model) as (srv, _):
      want = chat(client(srv), QUESTIONS[0])
    assert got.choices[0].message.content == want.choices[0].message.content
    # --max_tokens is the default answer length
    assert got.usage.completion_tokens == want.usage.completion_tokens
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (tmp_path / "log").read_text()[-3000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["url"] == f"http://127.0.0.1:{port}" and summary["responses"]["200"] >= 2
  finally:
    if proc.poll() is None:
      proc.kill()


def test_a_chunked_request_body_is_refused_with_411(server):
  srv = server[0]
  conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
  conn.putrequest("POST", "/v1/chat/completions")
  conn.putheader("Content-Type", "application/json")
  conn.putheader("Transfer-Encoding", "chunked")
  conn.endheaders()
  conn.send(b"2\r\n{}\r\n0\r\n\r\n")
  r = conn.getresponse()
  assert_error(r.status, json.loads(r.read()), 411, "Content-Length")
  conn.close()
  assert chat(client(srv), "hi").choices[0].message.content


def test_a_failing_model_answers_500_and_the_server_goes_on(model):
  def broken(*args, **kwargs):
    raise RuntimeError("device lost")

  with running(model, generate_fn=broken) as (srv, _):
    c = client(srv)
    for _ in range(2):
      with pytest.raises(openai.InternalServerError) as e:
        chat(c, "hi")
      assert "device lost" in str(e.value) and e.value.body["type"] == "server_error"
    with pytest.raises(openai.APIError, match="device lost"):
      list(chat(c, "hi", stream=True))
    assert c.models.list().data[0].id == "tiny-chat"
