"""The chat session, its REPL and streaming, and both command lines run as subprocesses."""

import io
import json
import os
import shutil
import subprocess
import sys

from helpers import REPO
from hf_reference import TINY_GQA, save_hf_model
import jax
import pytest

from astrollama_jax.chat_session import ChatSession
from astrollama_jax.commands.chat import HELP, run_repl
from astrollama_jax.data.chat_formats import Conversation
from astrollama_jax.data.chat_templates import LLAMA2
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.formats import hf
from astrollama_jax.generation import TextStream, generate

NEW = 24  # as in test_generate: the same compiled shapes serve both modules and the subprocesses


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_path):
  """(HF folder with tokenizer.model, cfg, params, tokenizer)."""
  folder = tmp_path_factory.mktemp("hf")
  save_hf_model(TINY_GQA, folder, seed=1)
  shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
  cfg, params = hf.load_hf(str(folder))
  return folder, cfg.replace(compute_dtype="float32"), params, Tokenizer(tokenizer_path)


def session(model, **kw):
  _, cfg, params, tok = model
  return ChatSession(cfg, params, tok, **{"max_new_tokens": NEW, "temperature": 0.0, **kw})


def test_session_streams_the_answer_and_keeps_the_history(model):
  _, cfg, params, tok = model
  s = session(model, system="You are an astronomer.")
  pieces = []
  first = s.reply("What is a quasar?", pieces.append)
  assert "".join(pieces).strip() == first and len(pieces) > 1
  conv = Conversation(turns=(("user", "What is a quasar?"),), system="You are an astronomer.")
  ref = generate(cfg, params, [LLAMA2.prompt_ids(tok, conv)], NEW, tokenizer=tok)
  assert first == ref.texts[0].strip()

  second = s.reply("And a blazar?")
  conv = Conversation(
    turns=(("user", "What is a quasar?"), ("assistant", first), ("user", "And a blazar?")),
    system="You are an astronomer.",
  )
  ids = LLAMA2.prompt_ids(tok, conv)
  assert s.log[1]["prompt_tokens"] == len(ids)
  assert second == generate(cfg, params, [ids], NEW, tokenizer=tok).texts[0].strip()
  assert s.history == [("What is a quasar?", first), ("And a blazar?", second)]


def test_history_is_trimmed_to_the_context_keeping_the_system_prompt(model):
  _, cfg, params, tok = model
  s = ChatSession(
    cfg.replace(max_seq_len=160), params, tok, system="Answer briefly.", max_new_tokens=32
  )
  s.history = [
    (
      f"Question {i}: tell me about galaxy number {i} in the catalogue.",
      f"Galaxy {i} is a barred spiral with an active nucleus.",
    )
    for i in range(6)
  ]
  ids, drop = s.prompt_ids("And the next one?")
  assert 0 < drop < 6 and len(ids) <= 160 - 32
  kept = Conversation(
    turns=tuple(t for u, a in s.history[drop:] for t in (("user", u), ("assistant", a)))
    + (("user", "And the next one?"),),
    system="Answer briefly.",
  )
  assert ids == LLAMA2.prompt_ids(tok, kept)
  assert "<<SYS>>" in tok.decode(ids) and "galaxy number 5" in tok.decode(ids)
  # One more exchange would not fit: the dropped count is the smallest that does.
  wider = Conversation(
    turns=tuple(t for u, a in s.history[drop - 1 :] for t in (("user", u), ("assistant", a)))
    + (("user", "And the next one?"),),
    system="Answer briefly.",
  )
  assert len(LLAMA2.prompt_ids(tok, wider)) > 160 - 32

  history = list(s.history)
  with pytest.raises(ValueError, match="at most 128 fit"):
    s.reply("a very long message " * 40)
  assert s.history == history and not s.log  # nothing lost, nothing generated


def test_repl_commands(model):
  s = session(model)
  out = io.StringIO()
  lines = [
    "hi there",
    "/system Be brief.",
    "/reset",
    "/bogus",
    "/help",
    "",
    "hello again",
    "word " * 600,
    "/quit",
    "never answered",
  ]
  run_repl(s, lines, out, echo=True)
  text = out.getvalue()
  assert len(s.log) == 2 and s.system == "Be brief."
  assert [u for u, _ in s.history] == ["hello again"]  # /reset dropped the first exchange
  assert "[conversation cleared]" in text and "[unknown command /bogus" in text and HELP in text
  assert "[error]" in text and "never answered" not in text


def test_text_stream_holds_back_partial_characters_and_stop_strings(tokenizer_path):
  tok = Tokenizer(tokenizer_path)
  text = "Die Größe von α Cen ist 1.1 R☉ STOP danach nichts"
  ids = tok.encode(text, bos=False)
  pieces = []
  stream = TextStream(tok, pieces.append, stop_strings=["STOP"])
  for i in ids:
    stream.update([[i]])
    assert "\ufffd" not in "".join(pieces)
    assert "S" not in "".join(pieces)[len("Die Größe von α Cen ist 1.1 R☉ ") :]
  assert "".join(pieces) == tok.decode(ids)[: tok.decode(ids).index("STOP")]
  stream.finish("".join(pieces))
  assert "".join(pieces).endswith("R☉ ")


def _run(command, *args, stdin=None):
  env = dict(os.environ)  # with conftest's compilation cache
  return subprocess.run(
    [sys.executable, "-m", "astrollama_jax", command, *args],
    input=stdin,
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )


def test_chat_cli_over_piped_stdin(model):
  folder = model[0]
  proc = _run(
    "chat",
    f"--checkpoint={folder}",
    "--temperature=0",
    f"--max_new_tokens={NEW}",
    "--compute_dtype=float32",
    "--system=Be brief.",
    stdin="What is a quasar?\n/reset\nHi!\n/quit\nno\n",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  s = session(model, system="Be brief.")
  first = s.reply("What is a quasar?")
  s.reset()
  second = s.reply("Hi!")
  out = proc.stdout
  assert (
    out.index(">>> What is a quasar?") < out.index(first) < out.index(">>> Hi!") < out.index(second)
  )
  assert ">>> no" not in out
  assert json.loads(out.strip().splitlines()[-1])["turns"] == 2


def test_generate_cli_jsonl(model, tmp_path):
  folder, cfg, params, tok = model
  prompts = ["The Hubble constant", "Dark matter halos are", "X", "Stellar winds"]
  src = tmp_path / "prompts.jsonl"
  src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
  out = tmp_path / "out.jsonl"
  proc = _run(
    "generate",
    f"--checkpoint={folder}",
    f"--prompts_file={src}",
    f"--output={out}",
    f"--max_new_tokens={NEW}",
    "--compute_dtype=float32",
    "--batch_size=3",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in records] == [0, 1, 2, 3]
  ref = [
    t
    for batch in (prompts[:3], prompts[3:])
    for t in generate(  # the command's batches
      cfg, params, [tok.encode(p) for p in batch], NEW, tokenizer=tok
    ).texts
  ]
  assert [r["completion"] for r in records] == ref
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["prompts"] == 4 and summary["generated_tokens"] == sum(
    r["num_tokens"] for r in records
  )


def test_generate_cli_names_the_bad_line(model, tmp_path):
  src = tmp_path / "bad.jsonl"
  src.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
  proc = _run("generate", f"--checkpoint={model[0]}", f"--prompts_file={src}")
  assert proc.returncode != 0
  assert f"{src}:2" in proc.stderr and "'prompt'" in proc.stderr


def test_undecodable_input_gets_an_error_line_not_a_crash(model, tmp_path):
  """Invalid UTF-8 on stdin is answered with an error; a lone surrogate in a prompts file, a NaN
  temperature and an output that is a folder are refused before the model loads, naming them."""
  folder = model[0]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "astrollama_jax",
      "chat",
      f"--checkpoint={folder}",
      "--temperature=0",
      f"--max_new_tokens={NEW}",
      "--compute_dtype=float32",
    ],
    input=b"\xff\xfe bad bytes\nHi!\n",
    capture_output=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.decode()
  assert "[error] input: text that cannot be encoded as UTF-8" in out
  assert json.loads(out.strip().splitlines()[-1])["turns"] == 1  # the good line was answered

  src = tmp_path / "p.jsonl"
  src.write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 text"}\n')
  for args, needle in (
    ([f"--prompts_file={src}"], f"{src}:2: text that cannot be encoded"),
    (["--prompt=x", "--temperature=nan"], "temperature must be a finite number"),
    (["--prompt=x", f"--output={tmp_path}"], "is a folder"),
  ):
    proc = _run("generate", f"--checkpoint={folder}", *args)
    assert proc.returncode == 1 and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
