"""LLaMA 3's byte-level BPE: both layouts give transformers' ids; the factory picks by file."""

import json
import pickle
import re

import pytest

from astrollama_jax.data import pipeline
from astrollama_jax.data.tokenizer import (
  SPECIAL_TOKENS,
  HFBPETokenizer,
  SentencePieceTokenizer,
  TiktokenTokenizer,
  Tokenizer,
  detect,
  load_tokenizer,
)

EDGE_CASES = [
  "This is a test sentence.",
  "",
  " leading space",
  "CRLF\r\nline\r\n\r\n",
  "tabs\t\tand   spaces   ",
  "  \n\n  \t",
  "$M_\\text{star}=10^{11}M_\\odot$, \\begin{equation} E = mc^2 \\end{equation}",
  "Ångström ±σ 日本語のテキスト 👩‍🔬 emoji",
  "1234567890 3.14159e-10 I'll you've WE'LL",
  "a" * 3000 + " " * 500 + "b",
  "Hello <|eot_id|> and <|begin_of_text|> as plain text",
]


@pytest.fixture(scope="module")
def llama3_dir(shared_data):
  path = shared_data / "tokenizer" / "llama3"
  if not (path / "tokenizer.json").exists():
    pytest.skip("LLaMA 3 tokenizer not in shared data")
  return path


@pytest.fixture(scope="module")
def tok(llama3_dir):
  return Tokenizer(llama3_dir)


@pytest.fixture(scope="module")
def meta_tok(llama3_dir):
  pytest.importorskip("tiktoken")
  return Tokenizer(llama3_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(llama3_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(llama3_dir))


@pytest.fixture(scope="module")
def texts(shared_data):
  """300 real titles + abstracts and every LaTeX source file."""
  out = []
  with open(shared_data / "arxiv-astro-ph" / "abstracts.jsonl") as f:
    for _ in range(150):
      r = json.loads(next(f))
      out += [r["title"], r["abstract"]]
  latex = sorted((shared_data / "latex").rglob("*.tex"))
  assert len(latex) >= 20
  out += [p.read_text(encoding="utf-8", errors="replace") for p in latex]
  assert not any("<|" in t for t in out)  # HF would read these as special tokens; we do not
  return out


def test_factory_chooses_by_file(llama3_dir, tok, meta_tok, tokenizer_path):
  assert type(tok) is HFBPETokenizer and tok.path == str(llama3_dir / "tokenizer.json")
  assert type(meta_tok) is TiktokenTokenizer
  assert type(Tokenizer(llama3_dir / "tokenizer.json")) is HFBPETokenizer
  assert type(load_tokenizer(tokenizer_path)) is SentencePieceTokenizer
  assert detect(llama3_dir / "tokenizer.model") == ("tiktoken", str(llama3_dir / "tokenizer.model"))
  for t in (tok, meta_tok):
    assert isinstance(t, Tokenizer)
    copy = pickle.loads(pickle.dumps(t))
    assert type(copy) is type(t) and copy.encode("a parsec") == t.encode("a parsec")


def test_sentencepiece_folder_is_read_by_its_model(tmp_path, tokenizer_path):
  """A LLaMA-2 export folder has a converted tokenizer.json too; the exact model wins."""
  (tmp_path / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
  (tmp_path / "tokenizer.json").write_text("{}")
  t = Tokenizer(tmp_path)
  assert type(t) is SentencePieceTokenizer and t.path == str(tmp_path / "tokenizer.model")
  assert (t.bos_id, t.eos_id, t.eot_id, t.stop_ids, t.pad_id) == (1, 2, 2, (2,), 0)
  assert t.token_id("<|eot_id|>") is None and t.token_id("</s>") == 2


def test_missing_or_wrong_files_are_named(tmp_path, llama3_dir):
  with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
    Tokenizer(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    Tokenizer(tmp_path)
  with pytest.raises(ValueError, match="is a tokenizer.json tokenizer, not sentencepiece"):
    SentencePieceTokenizer(llama3_dir / "tokenizer.json")
  bad = tmp_path / "tokenizer.model"
  bad.write_text("IQ== 0\nIg== 1\nnot base64!! x\n")
  with pytest.raises(ValueError, match=r"tokenizer.model:3: not a 'base64 rank'"):
    Tokenizer(bad)
  bad.write_text("IQ== 0\nIg== 0\n")
  with pytest.raises(ValueError, match="ranks are not 0..1 each once"):
    Tokenizer(bad)
  tokenizers = pytest.importorskip("tokenizers")
  other = tmp_path / "tokenizer.json"
  tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0}, [])).save(str(other))
  with pytest.raises(ValueError, match=r"has no <\|begin_of_text\|> token: not a LLaMA 3"):
    Tokenizer(other)


def test_special_ids_come_from_the_tokenizer(tok, meta_tok, hf_tok):
  for t in (tok, meta_tok):
    assert t.vocab_size == 128256 == len(hf_tok)
    assert (t.bos_id, t.eos_id, t.eot_id, t.pad_id) == (128000, 128001, 128009, 128004)
    assert (t.start_header_id, t.end_header_id) == (128006, 128007)
    assert t.stop_ids == (128001, 128008, 128009)
    assert t.special_id("<|python_tag|>") == 128010
    with pytest.raises(ValueError, match=re.escape("has no <|image|> token")):
      t.special_id("<|image|>")
    assert [t.id_to_piece(i) for i in range(128000, 128256)] == list(SPECIAL_TOKENS)
    assert [t.id_to_piece(i) for i in range(128000, 128256)] == hf_tok.convert_ids_to_tokens(
      list(range(128000, 128256))
    )
    assert t.bos_id == hf_tok.bos_token_id
  pieces = list(range(0, 128000, 997))
  assert [meta_tok.id_to_piece(i) for i in pieces] == hf_tok.convert_ids_to_tokens(pieces)


@pytest.fixture(scope="module")
def json_ids(tok, texts):
  """Our ids of every text (no begin of text), computed once: the LaTeX is 1.6M characters."""
  return tok.encode_batch(texts + EDGE_CASES, bos=False)


def test_ids_equal_auto_tokenizer_on_real_text(tok, hf_tok, texts, json_ids):
  for text, ids in zip(texts + EDGE_CASES[:-1], json_ids):
    assert ids == hf_tok.encode(text, add_special_tokens=False), text[:80]
  for text in texts[:300] + EDGE_CASES[:-1]:  # with the begin of text HF's post-processor adds
    assert tok.encode(text) == hf_tok.encode(text), text[:80]


def test_meta_tokenizer_model_equals_tokenizer_json(meta_tok, texts, json_ids):
  for text, ids in zip(texts + EDGE_CASES, json_ids):
    assert meta_tok.encode(text, bos=False) == ids, text[:80]
  assert meta_tok.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]


def test_special_token_text_stays_text(tok, meta_tok):
  for t in (tok, meta_tok):
    ids = t.encode("Hello <|eot_id|> there", bos=False)
    assert not set(ids) & set(range(128000, 128256))
    assert t.decode(ids) == "Hello <|eot_id|> there"


def test_decode_round_trip(tok, meta_tok, hf_tok, texts):
  for text in texts[:60] + texts[-5:] + EDGE_CASES:
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text == meta_tok.decode(ids)
  ids = tok.encode("a document", eos=True)
  assert tok.decode(ids) == meta_tok.decode(ids) == hf_tok.decode(ids)


def test_packing_separates_documents_like_llama3_base(tok):
  """CPT examples: <|begin_of_text|> document <|end_of_text|>, as the base models were trained."""
  tokenize = pickle.loads(pickle.dumps(pipeline._Tokenize(tok)))  # as a Grain worker gets it
  ex = tokenize({"text": b"A galaxy."})
  ids = tok.encode("A galaxy.", bos=False)
  assert ex["tokens"].tolist() == [128000, *ids] and ex["targets"].tolist() == [*ids, 128001]
