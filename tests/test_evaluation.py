"""The trainer's evaluation reads every validation record exactly once, on any process count.

The last batch of each process is padded with empty rows and a process whose share ran out feeds
empty batches until every process's has: the loss-bearing tokens counted are exactly the next-
token targets of the whole validation split, on 1 process and on 2.
"""

from helpers import TOKENIZER, need
from helpers_train import TINY_MODEL, finish, finish_processes, start, start_processes, train_cmd
import pytest

from astrollama_jax.data.corpus import read as corpus
from astrollama_jax.data.tokenizer import Tokenizer

RUN = [
  *TINY_MODEL,
  "--config.init_checkpoint=",
  "--config.data.seq_len=48",  # the split's rows do not fill whole batches
  "--config.train.global_batch_size=8",
  "--config.train.num_steps=1",
  "--config.eval.batch_size=8",
  "--config.eval.every=0",
  "--config.eval.at_start=False",
  "--config.eval.at_end=True",
  "--config.checkpoint.every=0",
  "--config.log.every=1",
  "--config.loss.chunk_size=0",
]


@pytest.fixture(scope="module")
def corpus_dir(demo_corpus):
  need(TOKENIZER)
  return demo_corpus


def _targets(corpus_dir) -> int:
  """Next-token targets of the validation split: ``[BOS] doc [EOS]`` gives len(doc) + 1."""
  tok = Tokenizer(str(TOKENIZER))
  source = corpus.read_split(str(corpus_dir), "validation")
  texts = [source[i]["text"] for i in range(len(source))]
  texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
  return sum(len(tok.encode(t, bos=True, eos=True)) - 1 for t in texts)


def test_every_validation_record_is_read_once_on_one_and_two_processes(tmp_path, corpus_dir):
  want = _targets(corpus_dir)
  args = [*RUN, f"--config.data.lm.path={corpus_dir}", f"--config.data.tokenizer_path={TOKENIZER}"]
  # The two runs are independent: they start (imports, compiles) side by side.
  one_proc = start(train_cmd(tmp_path / "one", *args), 8, tmp_path / "one.log")
  two_procs = start_processes(
    tmp_path / "two",
    *args,
    "--config.mesh=(2,2,2)",
    processes=2,
    devices=4,
    log_dir=tmp_path,
    name="two",
  )
  try:
    one = finish(one_proc, tmp_path / "one.log")
    assert one["eval"]["tokens"] == want
    two = finish_processes(two_procs, tmp_path, "two")
  finally:
    for p in [one_proc, *two_procs]:
      if p.poll() is None:
        p.kill()
  assert two[0]["eval"]["tokens"] == want
