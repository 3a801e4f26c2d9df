"""Packing and the Grain LM pipeline: batch contract, sharding, mixing, state."""

from __future__ import annotations

import collections
import json

from absl import flags
import grain
from helpers import DEMO_CORPUS, TOKENIZER, abstracts_subset, need
import numpy as np
import pytest

from astrollama_jax.data import packing, pipeline, shards
from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.corpus.build import build
from astrollama_jax.data.corpus.config import CorpusConfig
from astrollama_jax.data.tokenizer import Tokenizer

flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  need(TOKENIZER)
  tmp = tmp_path_factory.mktemp("lm_data")
  subset = abstracts_subset(tmp, 300)
  config = CorpusConfig(
    sources=[str(DEMO_CORPUS), str(subset)], validation_fraction=0.1, progress=False
  )
  build(config, tmp / "out")
  return tmp / "out"


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(need(TOKENIZER))


def _ds(data_dir, **kw):
  args = dict(
    split="train",
    tokenizer_path=TOKENIZER,
    seq_len=256,
    batch_size=4,
    seed=0,
    process_index=0,
    process_count=1,
  )
  args.update(kw)
  return pipeline.make_lm_dataset(data_dir, **args)


def _docs(batches, bos):
  """Documents (token tuples) in stream order, rebuilt from packed rows."""
  stream = []
  for b in batches:
    for row, seg in zip(b["tokens"], b["segment_ids"]):
      stream.extend(row[seg > 0].tolist())
  docs, cur = [], []
  for t in stream:
    if t == bos and cur:
      docs.append(tuple(cur))
      cur = []
    cur.append(t)
  if cur:
    docs.append(tuple(cur))
  return docs


def _assert_row_contract(b, bos, eos):
  assert set(b) == set(packing.BATCH_KEYS)
  for k in ("tokens", "targets", "segment_ids", "positions"):
    assert b[k].dtype == np.int32, k
  assert b["loss_mask"].dtype == np.float32
  for tokens, targets, seg, pos, mask in zip(*(b[k] for k in packing.BATCH_KEYS)):
    np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
    real = seg > 0
    assert np.all(np.diff(seg[real]) >= 0) and seg[real][0] == 1
    pad = np.flatnonzero(~real)
    assert pad.size == 0 or pad[0] == len(seg) - pad.size, "padding only at the end of a row"
    for s in np.unique(seg[real]):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      # inside a segment each target is the next input
      np.testing.assert_array_equal(targets[idx[:-1]], tokens[idx[1:]])
    starts = np.flatnonzero(real & (pos == 0))
    # a segment starts with BOS unless it is the continuation of a split document
    assert sum(tokens[starts] == bos) >= len(starts) - 1
    assert np.all(targets[real & (np.roll(tokens, -1) == bos)][:-1] == eos)


# ----------------------------------------------------------------------------- packing


def test_lm_example_shifts_by_one():
  ex = packing.lm_example([1, 5, 6, 2])
  np.testing.assert_array_equal(ex["tokens"], [1, 5, 6])
  np.testing.assert_array_equal(ex["targets"], [5, 6, 2])
  with pytest.raises(ValueError):
    packing.lm_example([1])


def test_pack_splits_long_documents_and_keeps_sft_masks():
  examples = [
    {"tokens": np.arange(10, 13), "targets": np.arange(11, 14), "loss_mask": [0, 1, 1]},
    {"tokens": np.arange(20, 29), "targets": np.arange(21, 30), "loss_mask": [1] * 9},
    {"tokens": np.arange(30, 32), "targets": np.arange(31, 33), "loss_mask": [0, 0]},
  ]
  ds = packing.pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 5)
  rows = list(ds)
  assert len(rows) == 3
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(rows[0]["loss_mask"], [0, 1, 1, 1, 1])
  np.testing.assert_array_equal(rows[1]["tokens"], [22, 23, 24, 25, 26])  # chunk: new segment
  np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(rows[2]["segment_ids"], [1, 1, 2, 2, 0])
  np.testing.assert_array_equal(rows[2]["loss_mask"], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows[2]["targets"][:4], [28, 29, 31, 32])
  batch = next(
    iter(packing.pack_examples(grain.MapDataset.source(examples).to_iter_dataset(), 5).batch(2))
  )
  assert batch["tokens"].shape == (2, 5)


def test_first_fit_keeps_examples_whole():
  examples = [
    {"tokens": np.arange(n), "targets": np.arange(n), "loss_mask": np.ones(n)} for n in (3, 4, 2, 7)
  ]
  rows = list(
    packing.pack_examples(
      grain.MapDataset.source(examples).to_iter_dataset(), 5, method="first_fit", num_packing_bins=2
    )
  )
  lengths = sorted(
    int(np.sum(r["segment_ids"] == s)) for r in rows for s in np.unique(r["segment_ids"]) if s > 0
  )
  assert lengths == [2, 3, 4, 5]  # the 7 was truncated to 5, nothing split


# ----------------------------------------------------------------------------- pipeline


def test_batches_follow_the_contract_and_pack_densely(data_dir, tok):
  it = iter(_ds(data_dir, seq_len=512, batch_size=4))
  real = slots = 0
  for _ in range(15):
    b = next(it)
    assert b["tokens"].shape == (4, 512)
    _assert_row_contract(b, tok.bos_id, tok.eos_id)
    r, s = pipeline.count_tokens(b)
    real, slots = real + r, slots + s
  assert real / slots >= 0.95
  first = _docs([b], tok.bos_id)[1]
  assert tok.decode(first).strip()  # real text


def test_same_seed_same_batches_and_epochs_reshuffle(data_dir, tok):
  a = [next(iter(_ds(data_dir, seed=3))) for _ in range(2)]
  np.testing.assert_array_equal(a[0]["tokens"], a[1]["tokens"])
  other = next(iter(_ds(data_dir, seed=4)))
  assert not np.array_equal(a[0]["tokens"], other["tokens"])
  two = list(_ds(data_dir, num_epochs=2, drop_remainder=False, seq_len=2048, batch_size=8))
  docs = _docs(two, tok.bos_id)
  half = len(docs) // 2
  assert collections.Counter(docs[:half]) == collections.Counter(docs[half:])
  assert docs[:half] != docs[half:]


def test_sharding_is_disjoint_and_complete(data_dir, tok):
  def docs(index, count):
    ds = _ds(
      data_dir,
      process_index=index,
      process_count=count,
      num_epochs=1,
      shuffle=False,
      drop_remainder=False,
      seq_len=2048,
      batch_size=8,
    )
    return collections.Counter(_docs(list(ds), tok.bos_id))

  whole = docs(0, 1)
  parts = [docs(i, 3) for i in range(3)]
  assert sum(parts, collections.Counter()) == whole
  for i in range(3):
    for j in range(i + 1, 3):
      assert not set(parts[i]) & set(parts[j])
  with pytest.raises(ValueError, match="process_index"):
    _ds(data_dir, process_index=3, process_count=3)


def test_mixture_weights_sections(data_dir, tok):
  src = corpus.read_split(data_dir, "train")
  intros = {
    tuple(tok.encode(r["text"].decode(), bos=True, eos=True)[:-1])
    for r in src
    if r["section"] == b"introduction"
  }
  assert intros
  ds = _ds(data_dir, mixture={"abstract": 0.5, "introduction": 0.5}, seq_len=2048, batch_size=4)
  it = iter(ds)
  docs = _docs([next(it) for _ in range(20)], tok.bos_id)[1:-1]  # ends may be partial
  frac = sum(d in intros for d in docs) / len(docs)
  assert 0.3 < frac < 0.7, frac
  only = _docs([next(iter(_ds(data_dir, mixture={"introduction": 1}, seq_len=4096)))], tok.bos_id)[
    :-1
  ]
  assert only and all(d in intros for d in only)
  with pytest.raises(ValueError, match="unknown sections"):
    _ds(data_dir, mixture={"methods": 1.0})


def _check_restore(ds, skip=3, take=3):
  it = iter(ds)
  for _ in range(skip):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(take)]
  it2 = iter(ds)
  it2.set_state(state)
  for want in expected:
    got = next(it2)
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  for i in (it, it2):
    if hasattr(i, "close"):
      i.close()


def test_state_restore_gives_the_uninterrupted_batches(data_dir):
  _check_restore(_ds(data_dir, mixture={"abstract": 0.6, "introduction": 0.2, "conclusion": 0.2}))


@pytest.mark.timeout(180)
def test_state_restore_with_workers(data_dir):
  _check_restore(_ds(data_dir, worker_count=1), skip=2, take=2)


def _global_batches(data_dir, processes: int, n: int, **kw) -> tuple[list[dict], list]:
  """The first ``n`` global batches of 8 rows read by ``processes`` processes over 8 data shards
  (each process's rows in process order), and every process's iterator."""
  its = [
    iter(_ds(data_dir, batch_size=8 // processes, process_index=p, process_count=processes, **kw))
    for p in range(processes)
  ]
  return [_concat([next(it) for it in its]) for _ in range(n)], its


def _concat(batches: list[dict]) -> dict:
  return {k: np.concatenate([b[k] for b in batches]) for k in packing.BATCH_KEYS}


def _assert_same(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(g[k], w[k])


def test_data_shards_give_the_same_global_batches_on_any_process_count(data_dir):
  want, _ = _global_batches(data_dir, 1, 4, shards=8, seq_len=64)
  assert len({b["tokens"].tobytes() for b in want}) == 4
  for processes in (2, 4, 8):
    _assert_same(_global_batches(data_dir, processes, 4, shards=8, seq_len=64)[0], want)
  # one shard per process (no data.shards) is another order: the layout is the shards'
  other, _ = _global_batches(data_dir, 2, 4, seq_len=64)
  assert other[0]["tokens"].tobytes() != want[0]["tokens"].tobytes()


def _resume_elsewhere(data_dir, before: int, after: int, n: int = 8, **kw) -> None:
  """Read 2 global batches on ``before`` processes over ``n`` shards, regather their states onto
  ``after`` processes: the next 2 global batches are those of an uninterrupted run."""
  want, _ = _global_batches(data_dir, 1, 4, shards=n, seq_len=64, **kw)
  got, its = _global_batches(data_dir, before, 2, shards=n, seq_len=64, **kw)
  states = [json.loads(json.dumps(it.get_state())) for it in its]
  resumed = []
  for p in range(after):
    it = iter(
      _ds(
        data_dir,
        batch_size=8 // after,
        process_index=p,
        process_count=after,
        shards=n,
        seq_len=64,
        **kw,
      )
    )
    it.set_state(shards.regather(states, shards.owned(p, after, n)))
    resumed.append(it)
  got += [_concat([next(it) for it in resumed]) for _ in range(2)]
  _assert_same(got, want)
  for it in its + resumed:
    if hasattr(it, "close"):
      it.close()


def test_a_data_position_regathers_onto_another_process_count(data_dir):
  for before, after in ((2, 1), (1, 4), (4, 2)):
    _resume_elsewhere(data_dir, before, after)
  _resume_elsewhere(data_dir, 2, 1, n=2, mixture={"abstract": 0.8, "introduction": 0.2})


@pytest.mark.timeout(180)
def test_a_data_position_with_workers_regathers_onto_another_process_count(data_dir):
  _resume_elsewhere(data_dir, 2, 1, worker_count=1)


def test_data_shards_must_divide_the_batch_and_be_shared_by_the_processes():
  shards.check_layout(8, 8, 2)
  with pytest.raises(ValueError, match="does not divide the global batch"):
    shards.check_layout(8, 3, 1)
  with pytest.raises(ValueError, match="4 processes cannot share data.shards 2"):
    shards.check_layout(8, 2, 4)
  with pytest.raises(ValueError, match="per process"):  # a per-process packing state, no shards
    shards.regather([{"next_index": 4}, {"next_index": 4, "packer": [7]}], range(0))


def test_a_position_saved_before_data_shards_resumes_on_one_shard_per_process(data_dir):
  """A checkpoint of a run without shards holds the bare packer state of each process: with one
  shard per process (``data.shards`` = its process count) it is that shard's state."""
  it = iter(_ds(data_dir, seq_len=64))
  next(it)
  bare = json.loads(json.dumps(it.get_state()))["shards"]["0"]
  want = [next(it) for _ in range(2)]
  it2 = iter(_ds(data_dir, seq_len=64))
  it2.set_state(bare)
  _assert_same([next(it2) for _ in range(2)], want)


def test_read_options_follow_the_worker_count(monkeypatch):
  monkeypatch.setattr(packing.os, "cpu_count", lambda: 8)
  got = {w: packing.read_options(w) for w in (0, 1, 2, 4, 8, 16)}
  assert {w: o.num_threads for w, o in got.items()} == {0: 2, 1: 2, 2: 2, 4: 2, 8: 1, 16: 1}
  assert {o.prefetch_buffer_size for o in got.values()} == {32}
  monkeypatch.setattr(packing.os, "cpu_count", lambda: None)
  assert packing.read_options(0).num_threads == 1
  # A process reading 8 data shards side by side splits one copy's read-ahead over them.
  monkeypatch.setattr(packing.os, "cpu_count", lambda: 8)
  shared = packing.read_options(0, streams=8)
  assert (shared.num_threads, shared.prefetch_buffer_size) == (1, 8)


def test_read_options_do_not_change_the_batches(data_dir, monkeypatch):
  """Read-ahead is a speed setting only: Grain's defaults give the same batches and states."""
  mix = {"abstract": 0.6, "introduction": 0.2, "conclusion": 0.2}
  ours = iter(_ds(data_dir, mixture=mix))
  want = [next(ours) for _ in range(4)]
  monkeypatch.setattr(packing, "read_options", lambda *_, **__: grain.ReadOptions())
  grains = iter(_ds(data_dir, mixture=mix))
  for b in want:
    got = next(grains)
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], b[k])
  assert grains.get_state() == ours.get_state()
