"""Expert ratings: stored durably by the server, exported as SFT and preference data, and one
feedback round (ratings -> export -> SFT from the served checkpoint) that lowers the loss on the
experts' corrections."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap

from helpers import REPO, free_port
from helpers_serve import (
  NEW,
  client,
  load,
  make_chat_hf_folder,
  post,
  running,
  start_cli,
  wait_ready,
)
from helpers_train import finish, records, start
import pytest

from astrollama_jax.data.chat_dataset import mix_sources
from astrollama_jax.data.chat_formats import load_conversations
from astrollama_jax.feedback import datasets
from astrollama_jax.feedback.store import FeedbackStore

openai = pytest.importorskip("openai")

# Questions and the answers an expert wrote in place of the (random) model's.
CORRECTED = [
  (
    "What is a quasar?",
    "A quasar is an active galactic nucleus powered by accretion onto a "
    "supermassive black hole, bright enough to outshine its host galaxy.",
  ),
  (
    "What is a parsec?",
    "A parsec is the distance at which one astronomical unit subtends one "
    "arcsecond: about 3.26 light years or 3.09e16 metres.",
  ),
  (
    "What is redshift?",
    "Redshift z is the fractional increase in wavelength of light, caused by "
    "recession velocity or by the expansion of the Universe.",
  ),
  (
    "What powers the Sun?",
    "The Sun is powered by hydrogen fusion into helium in its core, "
    "mostly through the proton-proton chain.",
  ),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_path):
  path = tmp_path_factory.mktemp("tiny_chat")
  make_chat_hf_folder(path, tokenizer_path)
  return path


@pytest.fixture(scope="module")
def model(folder):
  return load(folder)


def messages(question, system=None):
  return ([{"role": "system", "content": system}] if system else []) + [
    {"role": "user", "content": question}
  ]


def ask(c, question, system=None, **kw):
  msgs = messages(question, system)
  return c.chat.completions.create(
    model="tiny-chat", messages=msgs, **{"temperature": 0, "max_tokens": NEW, **kw}
  )


def rate(srv, completion_id, rating, correction=None, tags=(), headers=None):
  return post(
    srv.url + "/v1/feedback",
    {
      "completion_id": completion_id,
      "rating": rating,
      "correction": correction,
      "tags": list(tags),
    },
    headers,
  )


def test_a_rating_is_stored_before_the_answer_and_survives_kill_9(folder, tmp_path):
  db = tmp_path / "ratings.sqlite"
  port = free_port()
  proc = start_cli(
    f"--checkpoint={folder}",
    f"--port={port}",
    "--compute_dtype=float32",
    f"--feedback_db={db}",
    "--model_name=tiny-chat",
    log_path=tmp_path / "log",
  )
  try:
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    import openai as o

    c = o.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    answer = ask(c, "What is a blazar?", system="Be brief.", temperature=0.8, top_p=0.9, seed=5)
    status, row = post(
      f"http://127.0.0.1:{port}/v1/feedback",
      {
        "completion_id": answer.id,
        "rating": 2,
        "tags": ["Hallucination", "wrong units"],
        "correction": "A blazar is a quasar whose jet points at us.",
      },
    )
    assert status == 200, row
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  con = sqlite3.connect(db)
  con.row_factory = sqlite3.Row
  assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  (stored,) = [dict(r) for r in con.execute("SELECT * FROM ratings")]
  assert stored["id"] == row["id"] and stored["completion_id"] == answer.id
  assert json.loads(stored["messages"]) == [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a blazar?"},
  ]
  assert stored["answer"] == answer.choices[0].message.content
  assert stored["correction"] == "A blazar is a quasar whose jet points at us."
  assert stored["rating"] == 2
  assert json.loads(stored["tags"]) == ["hallucination", "wrong units"]
  assert stored["checkpoint"] == str(folder) and stored["model"] == "tiny-chat"
  sampling = json.loads(stored["sampling"])
  assert [sampling[k] for k in ("temperature", "top_p", "seed", "max_tokens")] == [0.8, 0.9, 5, NEW]
  assert stored["created_at"].endswith("+00:00")


def test_bad_ratings_are_refused_and_listed_ones_are_newest_first(model, tmp_path):
  store = FeedbackStore(tmp_path / "r.sqlite")
  with running(model, feedback=store) as (srv, _):
    c = client(srv)
    a, b = ask(c, "What is a quasar?"), ask(c, "What is a pulsar?")
    for body, status, word in [
      ({"completion_id": "chatcmpl-nope", "rating": 3}, 404, "unknown completion_id"),
      ({"completion_id": a.id, "rating": 0}, 400, "rating"),
      ({"completion_id": a.id, "rating": "5"}, 400, "rating"),
      ({"completion_id": a.id, "rating": True}, 400, "rating"),
      ({"completion_id": a.id, "rating": 3, "tags": "x"}, 400, "tags"),
      ({"completion_id": a.id, "rating": 3, "tags": [""]}, 400, "tag"),
      ({"completion_id": a.id, "rating": 3, "correction": 7}, 400, "correction"),
      ({"completion_id": a.id, "rating": 3, "stars": 3}, 400, "stars"),
    ]:
      got, payload = post(srv.url + "/v1/feedback", body)
      assert got == status and word in payload["error"]["message"], (body, payload)
    assert rate(srv, a.id, 4)[0] == 200 and rate(srv, b.id, 1, "A neutron star.")[0] == 200
    import urllib.request

    with urllib.request.urlopen(srv.url + "/v1/feedback?limit=5") as r:
      listed = json.loads(r.read())["data"]
    assert [x["completion_id"] for x in listed] == [b.id, a.id]
    assert listed[0]["correction"] == "A neutron star."
    assert listed[0]["messages"][-1]["content"] == "What is a pulsar?"
  with running(model) as (srv, _):  # no --feedback_db: the page chats, ratings say why not
    got, payload = rate(srv, ask(client(srv), "hi").id, 5)
    assert got == 404 and "--feedback_db" in payload["error"]["message"]


def add(
  store, cid, question, answer, rating, correction=None, tags=(), created_at=None, system=None
):
  return store.add(
    completion_id=cid,
    checkpoint="ckpt-a" if rating % 2 else "ckpt-b",
    model="m",
    messages=messages(question, system),
    answer=answer,
    rating=rating,
    correction=correction,
    tags=tags,
    sampling={"temperature": 0.0},
    created_at=created_at,
  )


def feedback_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "astrollama_jax", "feedback", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_export_and_stats(tmp_path):
  store = FeedbackStore(tmp_path / "r.sqlite")
  add(store, "c0", "Old question?", "Old answer.", 5, created_at="2020-01-01T00:00:00.000+00:00")
  add(
    store,
    "c1",
    "What is a quasar?",
    "A kind of star.",
    2,
    "An accreting supermassive black hole.",
    ["hallucination"],
    system="Be brief.",
  )
  add(store, "c2", "What is a parsec?", "About 3.26 light years.", 5, tags=["good"])
  add(store, "c3", "What is a parsec?", "A unit of time.", 1, tags=["wrong units"])
  add(store, "c4", "What is redshift?", "Light stretched by expansion.", 3)
  add(store, "c4", "What is redshift?", "Light stretched by expansion.", 4)  # rated again: 4 counts
  out = tmp_path / "sft.jsonl"
  proc = feedback_cli("export", f"--db={store.path}", f"--output={out}", "--since=2024-01-01")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  counts = [summary[k] for k in ("ratings", "conversations", "corrected", "pairs")]
  assert counts == [4, 3, 1, 2]
  convs, report = load_conversations(out, "sharegpt")
  assert report == {"ok": 3}
  assert [(c.turns[-1][1], c.system) for c in convs] == [
    ("An accreting supermassive black hole.", "Be brief."),
    ("About 3.26 light years.", None),
    ("Light stretched by expansion.", None),
  ]
  pairs = [json.loads(line) for line in (tmp_path / "sft.pairs.jsonl").read_text().splitlines()]
  assert [(p["source"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
    ("correction", "An accreting supermassive black hole.", "A kind of star."),
    ("ratings", "About 3.26 light years.", "A unit of time."),
  ]
  assert pairs[0]["prompt"] == [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a quasar?"},
  ]
  # The SFT mixture reads the export as a weighted source.
  source = {"path": str(out), "format": "sharegpt", "count": None, "weight": 2.0}
  mixed = mix_sources([source], seed=0)
  assert len(mixed) == 6 and {c.turns[-1][1] for c in mixed} == {c.turns[-1][1] for c in convs}

  assert len(datasets.sft_conversations(store.rows(latest_per_answer=True), 5)) == 3  # c0, c1, c2
  proc = feedback_cli("stats", f"--db={store.path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  stats = json.loads(proc.stdout.strip().splitlines()[-1])
  assert stats["ratings"] == 6
  tags, ckpts = stats["per_tag"], stats["per_checkpoint"]
  assert tags["wrong units"]["ratings"] == 1 and tags["(no tag)"]["ratings"] == 3
  assert ckpts["ckpt-a"]["ratings"] == 4 and ckpts["ckpt-b"]["r2"] == 1
  assert "ratings per tag" in proc.stdout and "hallucination" in proc.stdout

  db, to = f"--db={store.path}", f"--output={out}"
  for args, word in [
    (["export", f"--db={tmp_path / 'none.sqlite'}", to], "does not exist"),
    (["export", db], "--output"),
    (["export", db, to, "--since=yesterday"], "--since"),
    (["export", db, to, "--min_rating=9"], "min_rating"),
    (["frobnicate", db], "export or stats"),
  ]:
    proc = feedback_cli(*args)
    assert proc.returncode != 0 and word in proc.stderr, (args, proc.stderr[-1000:])


def run_sft_round(workdir, init_checkpoint, export_path, tokenizer_path, steps: int = 16) -> dict:
  """The SFT command on the exported file, from ``init_checkpoint``; its summary and metrics.

  The only place that knows the train config's schema: a config file that starts from
  configs/demo_sft.py, trains on the export (a weighted source) and evaluates on it.
  """
  config = workdir.parent / f"{workdir.name}_config.py"
  demo, src = str(REPO / "configs" / "demo_sft.py"), str(export_path)
  config.write_text(
    textwrap.dedent(f"""
      import importlib.util
      spec = importlib.util.spec_from_file_location("demo_sft", {demo!r})
      demo_sft = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(demo_sft)

      def get_config():
        c = demo_sft.get_config()
        c.init_checkpoint = {str(init_checkpoint)!r}
        c.data.tokenizer_path = {str(tokenizer_path)!r}
        c.data.sft.sources = [dict(path={src!r}, format="sharegpt", count=None, weight=4.0)]
        c.data.sft.eval_sources = [dict(path={src!r}, format="sharegpt", count=None, weight=None)]
        c.data.seq_len = 128
        c.train.global_batch_size = 4
        c.train.num_steps = {steps}
        c.schedule.learning_rate = 3e-3
        c.schedule.warmup_ratio = 0.0
        c.log.every = 1
        c.checkpoint.every = {steps}
        c.checkpoint.keep = 1
        c.eval.batch_size = 1
        return c
      """)
  )
  log = workdir.parent / f"{workdir.name}.log"
  proc = start(
    [sys.executable, "-m", "astrollama_jax", "train", f"--config={config}", f"--workdir={workdir}"],
    1,
    log,
  )
  summary = finish(proc, log, timeout=400)
  return {"summary": summary, "eval": records(workdir, "eval")}


def test_a_feedback_round_lowers_the_loss_on_the_corrections(folder, tmp_path, tokenizer_path):
  # The served checkpoint is a converted one, which is also what the SFT round starts from.
  ckpt = tmp_path / "converted"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "convert",
      "--source_format=hf",
      f"--source={folder}",
      f"--output={ckpt}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  store = FeedbackStore(tmp_path / "ratings.sqlite")
  with running(load(ckpt), feedback=store) as (srv, _):
    c = client(srv)
    for question, correction in CORRECTED:
      answer = ask(c, question, system="You are an astronomer.")
      status, _ = rate(srv, answer.id, 1, correction, ["hallucination"])
      assert status == 200
  out = tmp_path / "feedback_sft.jsonl"
  summary = datasets.export(store, str(out), str(tmp_path / "pairs.jsonl"))
  assert summary["conversations"] == len(CORRECTED) and summary["pairs"] == len(CORRECTED)
  exported = load_conversations(out, "sharegpt")[0]
  assert [c.turns[-1][1] for c in exported] == [a for _, a in CORRECTED]

  result = run_sft_round(tmp_path / "sft", ckpt, out, tokenizer_path)
  evals = result["eval"]
  start_loss, end_loss = evals[0]["loss"], evals[-1]["loss"]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == result["summary"]["final_step"] > 0
  assert end_loss < start_loss - 1.0, evals  # nats per answer token, on the corrections
