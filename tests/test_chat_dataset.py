"""Chat SFT data: source mixtures and the Grain pipeline (batches, data shards, resume)."""

import json
from pathlib import Path

from helpers import SHARED_DATA
import numpy as np
import pytest

from astrollama_jax.data import chat_dataset, shards
from astrollama_jax.data.chat_templates import LLAMA2
from astrollama_jax.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
TOKENIZER = SHARED / "tokenizer" / "llama2" / "tokenizer.model"
DEMO_CHAT = REPO / "data" / "demo_chat" / "astro_chat.jsonl"

needs_tokenizer = pytest.mark.skipif(
  not TOKENIZER.exists(), reason="LLaMA-2 tokenizer not in shared data"
)


def _write_jsonl(path: Path, records) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def tok():
  if not TOKENIZER.exists():
    pytest.skip("LLaMA-2 tokenizer not in shared data")
  return Tokenizer(TOKENIZER)


# ---------------------------------------------------------------------------------------------
# Mixtures


def _numbered_source(path: Path, n: int, tag: str) -> Path:
  return _write_jsonl(
    path, [{"id": f"{tag}{i}", "conversations": [f"q{tag}{i}", f"a{tag}{i}"]} for i in range(n)]
  )


def test_mix_sources_counts_weights_and_determinism(tmp_path):
  a = _numbered_source(tmp_path / "a.jsonl", 30, "a")
  b = _numbered_source(tmp_path / "b.jsonl", 10, "b")
  c = _numbered_source(tmp_path / "c.jsonl", 4, "c")
  spec = [
    (str(a), "lima", 12, None),
    dict(path=str(b), format="auto", weight=0.5),
    chat_dataset.ChatSource(str(c)),
  ]
  report = {}
  mixed = chat_dataset.mix_sources(spec, seed=3, report=report)
  ids = [m.id for m in mixed]
  assert sum(i.startswith("a") for i in ids) == 12 and sum(i.startswith("b") for i in ids) == 5
  assert sorted(i for i in ids if i.startswith("c")) == ["c0", "c1", "c2", "c3"]
  assert len(set(ids)) == len(ids) == 21
  assert report[str(a)] == {"ok": 30, "taken": 12}
  assert ids == [m.id for m in chat_dataset.mix_sources(spec, seed=3)]
  assert ids != [m.id for m in chat_dataset.mix_sources(spec, seed=4)]
  assert ids[:12] != sorted(ids[:12])  # shuffled across sources
  # A source's picks do not depend on the other sources.
  alone = {m.id for m in chat_dataset.mix_sources([spec[0]], seed=3)}
  assert alone == {i for i in ids if i.startswith("a")}
  # Asking for more than there is repeats the source, each conversation at most twice here.
  over = [m.id for m in chat_dataset.mix_sources([(str(c), "auto", 7, None)], seed=0)]
  assert (
    len(over) == 7
    and set(over) == {"c0", "c1", "c2", "c3"}
    and max(over.count(i) for i in over) == 2
  )


def test_mix_sources_rejects_bad_specs(tmp_path):
  a = _numbered_source(tmp_path / "a.jsonl", 3, "a")
  with pytest.raises(ValueError, match="not both"):
    chat_dataset.mix_sources([(str(a), "auto", 1, 1.0)], seed=0)
  with pytest.raises(ValueError, match="unknown format"):
    chat_dataset.mix_sources([(str(a), "alpaca", None, None)], seed=0)
  with pytest.raises(ValueError, match="unknown keys"):
    chat_dataset.mix_sources([dict(path=str(a), cnt=3)], seed=0)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    chat_dataset.mix_sources([(str(tmp_path / "nope.jsonl"),)], seed=0)
  empty = _write_jsonl(tmp_path / "empty.jsonl", ["{}"])
  with pytest.raises(ValueError, match="no readable conversations"):
    chat_dataset.mix_sources([(str(empty), "auto", 2, None)], seed=0)


def test_sft_config_fields():
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "astro_chat_sft", REPO / "configs" / "astro_chat_sft.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert (
    config.data.kind == "sft" and config.data.seq_len == 2048 and config.model.preset == "llama2_7b"
  )
  counts = [s["count"] for s in config.data.sft.sources]
  assert counts == [10_356, None, 10_000, 10_000]
  assert [s["format"] for s in config.data.sft.sources] == [
    "sharegpt",
    "lima",
    "openorca",
    "ultrachat",
  ]
  assert [chat_dataset.ChatSource.of(s).count for s in config.data.sft.sources] == counts
  assert config.train.global_batch_size == 48 and config.schedule.warmup_ratio == 0.03
  assert (
    config.schedule.learning_rate == 2e-5
    and module.get_config("70b").schedule.learning_rate == 3e-7
  )
  assert module.get_config("70b").model.preset == "llama2_70b"


# ---------------------------------------------------------------------------------------------
# The Grain SFT pipeline


def _segments(batch):
  """(tokens, targets, loss_mask) of every packed segment of a batch, checking the row layout."""
  out = []
  for row in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][row]
    n = int(seg.max())
    used = seg > 0
    assert seg[used].tolist() == sorted(seg[used].tolist()) and set(seg[used].tolist()) == set(
      range(1, n + 1)
    )
    assert (np.diff(used.astype(int)) <= 0).all()  # padding only at the end
    assert (batch["loss_mask"][row][~used] == 0).all()
    for s in range(1, n + 1):
      where = seg == s
      assert batch["positions"][row][where].tolist() == list(range(int(where.sum())))
      out.append(
        tuple(tuple(batch[k][row][where].tolist()) for k in ("tokens", "targets", "loss_mask"))
      )
  return out


@needs_tokenizer
def test_sft_dataset_batches_shards_and_resumes(tok):
  sources = [(str(DEMO_CHAT), "sharegpt", None, None)]
  seq_len, batch_size = 192, 2
  # every example the mixture can produce, keyed by its tokens
  examples = {}
  for conv in chat_dataset.mix_sources(sources, seed=5):
    ex = LLAMA2.encode_for_training(tok, conv, seq_len)
    examples[tuple(ex["tokens"].tolist())] = (ex["targets"].tolist(), ex["loss_mask"].tolist())

  seen = []
  for process in range(2):
    ds = chat_dataset.make_sft_dataset(
      sources, TOKENIZER, seq_len, batch_size, seed=5, process_index=process, process_count=2
    )
    batches = list(ds)
    assert batches, "no batches"
    for batch in batches:
      assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
      for k, v in batch.items():
        assert v.shape == (batch_size, seq_len), k
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
      for tokens, targets, mask in _segments(batch):
        assert examples[tokens] == (list(targets), list(mask))
        seen.append((process, tokens))
  by_process = [{t for p, t in seen if p == q} for q in (0, 1)]
  assert by_process[0] and by_process[1] and not by_process[0] & by_process[1]
  assert (
    len(seen) == len(set(seen)) >= 0.7 * len(examples)
  )  # each once; a partial last batch is dropped

  # Iterator state: stop after two batches, restore in a fresh iterator, get the same rest.
  ds = chat_dataset.make_sft_dataset(
    sources, TOKENIZER, seq_len, batch_size, seed=5, num_epochs=None
  )
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(
    chat_dataset.make_sft_dataset(sources, TOKENIZER, seq_len, batch_size, seed=5, num_epochs=None)
  )
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@needs_tokenizer
def test_sft_data_shards_resume_on_another_process_count():
  """Over 4 data shards, 2 processes and 1 read the same global batches, and a position saved by
  2 processes regathers onto 1 (and 1 onto 4): the rest is the uninterrupted run's."""
  sources = [(str(DEMO_CHAT), "sharegpt", None, None)]

  def its(processes: int) -> list:
    return [
      iter(
        chat_dataset.make_sft_dataset(
          sources,
          TOKENIZER,
          192,
          4 // processes,
          seed=5,
          process_index=p,
          process_count=processes,
          shards=4,
          num_epochs=None,
        )
      )
      for p in range(processes)
    ]

  def batches(iterators: list, n: int) -> list[dict]:
    out = []
    for _ in range(n):
      parts = [next(it) for it in iterators]
      out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
    return out

  want = batches(its(1), 4)
  for before, after in ((2, 1), (1, 4)):
    first = its(before)
    got = batches(first, 2)
    states = [json.loads(json.dumps(it.get_state())) for it in first]
    second = its(after)
    for p, it in enumerate(second):
      it.set_state(shards.regather(states, shards.owned(p, after, 4)))
    got += batches(second, 2)
    for g, w in zip(got, want, strict=True):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k])
