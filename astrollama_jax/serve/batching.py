"""Concurrent requests through one compiled decode: a bounded queue and a worker that batches.

Why batches are formed this way (answers must not depend on who else is being served):

* Every ``generate`` call gets the same number of rows, ``width`` (``--max_batch`` rounded up to
  a power of two and to the mesh's data shards); missing rows repeat the first prompt. Together
  with grouping by prompt-length bucket and answer-length bucket, every call of a group runs the
  same compiled program on the same shapes, and in a transformer each row's arithmetic depends
  only on that row. So a greedy answer is bit-identical alone or among ``width - 1`` others.
* Rows of one call share ``temperature/top_k/top_p`` and one seed, so sampled requests group by
  those knobs; a request with its own ``seed`` runs alone in row 0, which makes it reproducible
  (the random bits of a row depend on the key, the row and the shape, all fixed then).
* ``max_tokens`` and stop strings are per request: the call runs to the group's largest
  ``max_tokens`` and each row is cut on the host. When every real row is done the stream
  callback ends the call early (``_AllDone``), so padding rows never cost extra steps.

The batching is static per call: a request that arrives while a call runs waits for the next
one (``generate`` has no way to add rows to a running decode). Calls run one at a time on one
worker thread, since they share the devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import itertools
import queue
import random
import threading
import time
from typing import Any

from absl import logging

from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.generation import TextStream, bucket, generate
from astrollama_jax.model.config import LlamaConfig

PROMPT_BUCKET = 64  # generate's smallest prompt bucket


class QueueFull(Exception):
  """The queue holds ``max_queue`` waiting prompts; the request should be retried later."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Per-request settings. ``temperature == 0`` is greedy; ``seed=None`` lets the server pick."""

  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: tuple[str, ...] = ()

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class Result:
  text: str
  completion_tokens: int
  finish_reason: str  # "stop" (end of sequence or a stop string) | "length"


class Job:
  """One prompt to continue. Text deltas and the end arrive on ``events`` as (kind, value):
  ("delta", str), then ("done", Result) or ("error", Exception)."""

  _serial = itertools.count()

  def __init__(self, prompt_ids: Sequence[int], sampling: Sampling):
    self.prompt_ids = list(prompt_ids)
    self.sampling = sampling
    self.events: queue.Queue = queue.Queue()
    self.cancelled = threading.Event()  # the client went away: stop spending steps on it
    self.serial = next(Job._serial)
    self.result: Result | None = None

  def cancel(self) -> None:
    self.cancelled.set()

  def wait(self) -> Result:
    """Block until the job ends; its deltas are dropped. Raises the job's error."""
    while True:
      kind, value = self.events.get()
      if kind == "done":
        return value
      if kind == "error":
        raise value


def group_key(job: Job) -> tuple:
  """Jobs with equal keys may share one ``generate`` call (see the module docstring)."""
  s = job.sampling
  shape = (bucket(len(job.prompt_ids), PROMPT_BUCKET), bucket(s.max_tokens))
  if s.temperature == 0:
    return shape + ("greedy",)
  knobs = (float(s.temperature), int(s.top_k), float(s.top_p))
  return shape + knobs + (("any",) if s.seed is None else ("seeded", job.serial))


def first_stop(text: str, stops: Sequence[str]) -> int:
  hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
  return min(hits) if hits else -1


class _AllDone(Exception):
  """Raised from the stream callback to end a call whose real rows are all finished."""


class _Row:
  """Host-side state of one job inside a call: its ids, stop strings, ``max_tokens``, stream."""

  def __init__(self, job: Job, tokenizer: Tokenizer):
    self.job, self.tokenizer = job, tokenizer
    self.ids: list[int] = []
    self.finished = False
    self.stream = TextStream(tokenizer, lambda t: job.events.put(("delta", t)), job.sampling.stop)

  def feed(self, new: list[int]) -> None:
    if self.finished:
      return
    if self.job.cancelled.is_set():
      self.finish("", 0, "cancelled")
      return
    room = self.job.sampling.max_tokens - len(self.ids)
    self.ids += new[:room]
    text = self.tokenizer.decode(self.ids)
    cut = first_stop(text, self.job.sampling.stop)
    if cut >= 0:
      self.finish(text[:cut], self._tokens_before(cut), "stop")
    elif len(self.ids) >= self.job.sampling.max_tokens:
      self.finish(text, len(self.ids), "length")
    else:
      self.stream.update([new[:room]])

  def _tokens_before(self, cut: int) -> int:
    """How many ids the text before a stop string takes: the usage count of a cut answer."""
    n = 0
    while n < len(self.ids) and len(self.tokenizer.decode(self.ids[: n + 1])) <= cut:
      n += 1
    return n

  def finish(self, text: str, tokens: int, reason: str) -> None:
    self.finished = True
    if reason == "cancelled":
      self.job.events.put(("error", ConnectionAbortedError("cancelled")))
      return
    self.stream.finish(text)
    self.job.result = Result(text, tokens, reason)
    self.job.events.put(("done", self.job.result))

  def fail(self, error: Exception) -> None:
    if not self.finished:
      self.finished = True
      self.job.events.put(("error", error))


class Batcher:
  """The queue and the worker thread; ``submit`` from any thread."""

  def __init__(
    self,
    cfg: LlamaConfig,
    params: Any,
    tokenizer: Tokenizer,
    *,
    mesh: Any = None,
    max_batch: int = 8,
    max_queue: int = 64,
    chunk_size: int = 4,
    window_s: float = 0.005,
    generate_fn: Callable[..., Any] = generate,
  ):
    """``generate_fn`` has ``generate.generate``'s signature (tests may pass another model)."""
    if max_batch < 1 or max_queue < 1 or chunk_size < 1:
      raise ValueError("max_batch, max_queue and chunk_size must be >= 1")
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self.width = -(-bucket(max_batch, 1) // shards) * shards
    self.max_batch, self.max_queue, self.chunk_size = max_batch, max_queue, chunk_size
    self.window_s, self.generate_fn = window_s, generate_fn
    self._pending: list[Job] = []
    self._cond = threading.Condition()
    self._closed = False
    self._thread: threading.Thread | None = None
    self.stats = {"calls": 0, "jobs": 0, "padding_rows": 0, "generated_tokens": 0, "rejected": 0}

  # --- the client side ---

  def submit(self, jobs: Sequence[Job]) -> None:
    """Queue ``jobs`` together (all or none); ``QueueFull`` if they do not fit."""
    with self._cond:
      if self._closed:
        raise RuntimeError("the server is shutting down")
      if len(self._pending) + len(jobs) > self.max_queue:
        self.stats["rejected"] += 1
        raise QueueFull(f"{len(self._pending)} prompts are waiting (at most {self.max_queue})")
      self._pending.extend(jobs)
      self._cond.notify_all()

  def pending(self) -> int:
    with self._cond:
      return len(self._pending)

  def start(self) -> Batcher:
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
      self._thread.start()
    return self

  def close(self) -> None:
    """Stop the worker after the running call; waiting jobs end with an error."""
    with self._cond:
      self._closed = True
      left, self._pending = self._pending, []
      self._cond.notify_all()
    for job in left:
      job.events.put(("error", RuntimeError("the server is shutting down")))
    if self._thread is not None:
      self._thread.join(timeout=60)

  # --- the worker side ---

  def _take_group(self) -> list[Job] | None:
    """The oldest waiting job and those that may share its call (None once closed)."""
    with self._cond:
      while not self._pending and not self._closed:
        self._cond.wait()
      if self._closed:
        return None
    time.sleep(self.window_s)  # let requests sent at the same moment join this call
    with self._cond:
      self._pending = [j for j in self._pending if not j.cancelled.is_set()]
      if not self._pending:
        return []
      key, group, longest, most = group_key(self._pending[0]), [], 0, 0
      for job in list(self._pending):
        if len(group) == self.max_batch or group_key(job) != key:
          continue
        new_longest = max(longest, len(job.prompt_ids))
        new_most = max(most, job.sampling.max_tokens)
        if group and new_longest + new_most > self.cfg.max_seq_len:
          continue  # would not fit beside the others; it leads a later call
        group.append(job)
        longest, most = new_longest, new_most
        self._pending.remove(job)
        if key[-2] == "seeded":
          break
      return group

  def _loop(self) -> None:
    while True:
      group = self._take_group()
      if group is None:
        return
      if group:
        self._run(group)

  def _run(self, jobs: list[Job]) -> None:
    s = jobs[0].sampling
    rows = [_Row(job, self.tokenizer) for job in jobs]
    prompts = [j.prompt_ids for j in jobs]
    prompts += [prompts[0]] * (self.width - len(prompts))
    seed = s.seed if s.seed is not None else random.getrandbits(31)
    max_new = max(j.sampling.max_tokens for j in jobs)

    def stream(new_ids: list[list[int]]) -> None:
      steps = max(len(x) for x in new_ids)
      for row, new in zip(rows, new_ids):
        row.feed(new)
        if not row.finished and len(new) < steps:  # fewer ids than the others: it met EOS
          row.finish(row.tokenizer.decode(row.ids), len(row.ids), "stop")
      if all(r.finished for r in rows):
        raise _AllDone

    self.stats["calls"] += 1
    self.stats["jobs"] += len(jobs)
    self.stats["padding_rows"] += self.width - len(jobs)
    try:
      res = self.generate_fn(
        self.cfg,
        self.params,
        prompts,
        max_new,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=seed,
        eos_id=self.tokenizer.stop_ids,
        tokenizer=self.tokenizer,
        mesh=self.mesh,
        stream=stream,
        chunk_size=self.chunk_size,
      )
      for row, reason in zip(rows, res.finish_reasons):
        if not row.finished:  # ended with the call: EOS, or the group's max_tokens (its own)
          row.finish(
            self.tokenizer.decode(row.ids), len(row.ids), "stop" if reason == "eos" else "length"
          )
    except _AllDone:
      pass
    except Exception as e:  # noqa: BLE001 - one bad call fails its own jobs, not the server
      logging.exception("generation failed for %d jobs", len(jobs))
      for row in rows:
        row.fail(e)
    self.stats["generated_tokens"] += sum(len(r.ids) for r in rows)
