"""The demo's own tokenizer: built from the shipped data alone, deterministic, laid out like
LLaMA-2's, and the size of the demo model's vocabulary."""

import os

from helpers import REPO, TOKENIZER
import pytest

from astrollama_jax.data import demo_tokenizer
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.errors import UserError


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
  return demo_tokenizer.ensure(tmp_path_factory.mktemp("demo_tok"))


def test_same_data_gives_the_same_model_and_a_built_one_is_reused(built, tmp_path):
  again = demo_tokenizer.ensure(tmp_path)
  assert open(again, "rb").read() == open(built, "rb").read()
  stamp = os.stat(again).st_mtime_ns
  assert demo_tokenizer.ensure(tmp_path) == again and os.stat(again).st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]  # no temporary left


def test_llama_special_ids_byte_fallback_and_the_demo_vocabulary(built):
  from astrollama_jax.commands.demo import load_config
  from astrollama_jax.train import resolve

  tok = Tokenizer(built)
  assert (tok.id_to_piece(0), tok.bos_id, tok.eos_id, tok._sp.pad_id()) == ("<unk>", 1, 2, -1)
  assert [tok.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]  # LLaMA's byte pieces
  for config in ("demo.py", "demo_sft.py"):
    cfg = resolve.preset_model_config(load_config(REPO / "configs" / config))
    assert cfg.vocab_size == tok.vocab_size == demo_tokenizer.vocab_size() == 4096
  # Text it never saw round-trips through byte pieces, never through <unk>.
  text = "Ωμέγα Centauri: 10^{6.2} M_⊙ at 5.2 kpc ✓\n\tdone"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids and tok.decode(ids) == text


def test_layout_matches_llama2(built):
  if not TOKENIZER.exists():
    pytest.skip(f"LLaMA-2 tokenizer not found at {TOKENIZER}")
  import sentencepiece.sentencepiece_model_pb2 as model_pb2

  ours, llama = model_pb2.ModelProto(), model_pb2.ModelProto()
  ours.ParseFromString(open(built, "rb").read())
  llama.ParseFromString(TOKENIZER.read_bytes())
  fields = ("model_type", "byte_fallback", "split_digits", "unk_id", "bos_id", "eos_id", "pad_id")
  assert [getattr(ours.trainer_spec, f) for f in fields] == [
    getattr(llama.trainer_spec, f) for f in fields
  ]
  norm = ("name", "precompiled_charsmap", "add_dummy_prefix", "remove_extra_whitespaces")
  assert [getattr(ours.normalizer_spec, f) for f in norm] == [
    getattr(llama.normalizer_spec, f) for f in norm
  ]
  assert [p.piece for p in ours.pieces[:259]] == [p.piece for p in llama.pieces[:259]]


def test_the_demo_names_a_missing_tokenizer_file(tmp_path):
  from astrollama_jax.commands.demo import find_tokenizer

  assert find_tokenizer(None) is None  # the demo's own
  assert find_tokenizer(str(TOKENIZER)) == str(TOKENIZER) or not TOKENIZER.exists()
  with pytest.raises(UserError, match="is not a file"):
    find_tokenizer(str(tmp_path / "nope.model"))
