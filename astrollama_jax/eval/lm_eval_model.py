"""The ``astrollama`` model of lm-evaluation-harness: its tasks scored by our scorer and generator.

Why a model class of our own rather than exporting to HF and using lm-eval's ``hf`` backend:
the checkpoint is evaluated as it is (any kind ``checkpoints.loader.load_model`` reads), on the
device mesh, multi-host, with the same packed float32 log-softmax as
``python -m astrollama_jax eval``.

What lm-eval asks and how it is answered:

* ``loglikelihood`` (multiple choice, cloze): lm-eval's own ``TemplateLM`` splits each
  (context, continuation) into tokens exactly as its ``hf`` backend does (whole text encoded,
  the context's tokens cut off, trailing spaces moved to the continuation); the pairs, cut from
  the left to ``max_length + 1`` tokens as ``hf`` does, go to ``scoring.Scorer`` as packed
  requests. ``is_greedy`` (is every continuation token the argmax?) is greedy decoding with
  ``generate.generate`` from the context, compared with the continuation.
* ``loglikelihood_rolling`` (perplexity): lm-eval's rolling windows (``max_length`` tokens, a
  BOS prefix, each token scored once), scored together in one ``Scorer`` run, summed per text.
* ``generate_until``: ``generate.generate`` with lm-eval's stop sequences (``until``, plus
  ``</s>``) and ``max_gen_toks``; greedy unless the task asks ``do_sample``.

Multi-host: every process runs the same requests in the same order (the model reports rank 0 of
1, so lm-eval does not split the documents): our scorer and generator are SPMD programs over the
global mesh. Each process gets the full results; only process 0 writes them.

Tokenization is SentencePiece with BOS, like the HF tokenizer the exporter writes; one known
difference: a text that starts with a space is encoded with an extra leading "▁" here.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
from typing import Any

from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
  handle_stop_sequences,
  normalize_gen_kwargs,
  postprocess_generated_text,
)

from astrollama_jax import sharding
from astrollama_jax.data.tokenizer import Tokenizer
from astrollama_jax.eval import common
from astrollama_jax.eval.scoring import Request, Scorer

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
# A continuation token with more than half the probability is the argmax: no need to decode.
_SURELY_GREEDY = math.log(0.5)


def _int_or_default(value: Any, default: int, name: str) -> int:
  """lm-eval passes batch sizes as ints, numeric strings or "auto[:N]" (not ours: the default)."""
  if value is None or (isinstance(value, str) and value.startswith("auto")):
    return default
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


@register_model("astrollama")
class AstroLlamaLM(TemplateLM):
  """lm-eval model over an astrollama-jax checkpoint (``--model astrollama``).

  ``model_args``: ``checkpoint`` (or ``pretrained``), and optionally ``tokenizer``, ``mesh``,
  ``dtype``, ``compute_dtype``, ``attention`` (the shared flags' meaning), ``batch_size`` (rows
  of ``max_length`` tokens per scoring step, prompts per generation call), ``max_length``
  (default: the model's context), ``max_gen_toks`` (default 256). A loaded ``common.Model``
  may be given as ``model`` instead of a checkpoint.
  """

  def __init__(
    self,
    checkpoint: str | None = None,
    *,
    model: common.Model | None = None,
    pretrained: str | None = None,
    tokenizer: str | None = None,
    mesh: str = sharding.DEFAULT_MESH,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    attention: str | None = None,
    batch_size: int | str | None = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    progress: bool = True,
    device: str | None = None,
    max_batch_size: int | None = None,
  ) -> None:
    super().__init__()
    del device, max_batch_size  # lm-eval's; the mesh places the model and the batch size is ours
    if model is None:
      checkpoint = checkpoint or pretrained
      if not checkpoint:
        raise ValueError("the astrollama model needs model_args checkpoint=PATH")
      model = common.load(checkpoint, str(mesh), dtype, compute_dtype, tokenizer, attention)
    self.model = model
    self.cfg = model.cfg
    self.sp = Tokenizer(model.tokenizer_path)
    self.sp.check_vocab(self.cfg.vocab_size)
    self._batch_size = max(1, _int_or_default(batch_size, DEFAULT_BATCH_SIZE, "batch_size"))
    self._max_length = int(max_length or self.cfg.max_seq_len)
    if not 1 < self._max_length <= self.cfg.max_seq_len:
      raise ValueError(
        f"max_length must be in [2, {self.cfg.max_seq_len}] (the model's context), "
        f"got {self._max_length}"
      )
    self._max_gen_toks = int(max_gen_toks)
    self.progress = bool(progress)
    self.scorer = Scorer(
      self.cfg,
      model.params,
      model.mesh,
      batch_size=self._batch_size,
      max_len=self._max_length,
      progress=self.progress,
    )

  @classmethod
  def create_from_arg_obj(
    cls, arg_dict: dict, additional_config: dict | None = None
  ) -> AstroLlamaLM:
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**arg_dict, **extra})

  @classmethod
  def create_from_arg_string(
    cls, arg_string: str, additional_config: dict | None = None
  ) -> AstroLlamaLM:
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  # --- what lm-eval reads -------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.sp.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.sp.bos_id  # the context of an empty-context request, as hf's LLaMA prefix

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return str(self.sp.path)

  def get_model_info(self) -> dict:
    return {
      "model_num_parameters": self.cfg.num_params(),
      "model_dtype": self.cfg.param_dtype,
      "compute_dtype": self.cfg.compute_dtype,
      "checkpoint": self.model.checkpoint,
    }

  def tok_encode(
    self,
    string: str,
    add_special_tokens: bool | None = None,
    left_truncate_len: int | None = None,
    **kwargs,
  ) -> list[int]:
    """SentencePiece ids; BOS unless ``add_special_tokens`` is False (hf's LLaMA default)."""
    ids = self.sp.encode(string, bos=add_special_tokens is not False)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.sp.decode(list(tokens))

  # --- scoring ------------------------------------------------------------------------------

  def _loglikelihood_tokens(
    self,
    requests: Sequence[tuple[Any, list[int], list[int]]],
    disable_tqdm: bool = False,
    greedy: bool = True,
  ) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), is_greedy) per (strings, context ids, continuation
    ids); identical pairs are scored once."""
    unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    slots = []
    for strings, context, continuation in requests:
      if not context or not continuation:
        raise ValueError(f"empty context or continuation for {strings!r}")
      if len(continuation) > self.max_length:
        raise ValueError(
          f"a continuation of {len(continuation)} tokens is longer than "
          f"max_length {self.max_length}"
        )
      whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
      key = (tuple(whole[: -len(continuation)]), tuple(continuation))
      slots.append(unique.setdefault(key, len(unique)))
    reqs = [Request(list(c), list(t)) for c, t in unique]
    logprobs, _ = self.scorer.logprobs(reqs, desc="loglikelihood")
    if greedy:
      is_greedy = self._is_greedy(reqs, logprobs)
    else:
      is_greedy = [False] * len(reqs)
    out = []
    for (strings, _, _), k in zip(requests, slots):
      answer = (float(logprobs[k].sum()), bool(is_greedy[k]))
      if strings is not None:
        self.cache_hook.add_partial("loglikelihood", strings, answer)
      out.append(answer)
    return out

  def _is_greedy(self, reqs: Sequence[Request], logprobs: Sequence[Any]) -> list[bool]:
    """Whether greedy decoding from each context reproduces its target (lm-eval's is_greedy)."""
    from astrollama_jax.generation import generate

    out = [bool((lp > _SURELY_GREEDY).all()) for lp in logprobs]
    todo = sorted(
      (i for i in range(len(reqs)) if not out[i]),
      key=lambda i: (len(reqs[i].target), len(reqs[i].context)),
    )
    while todo:
      n = len(reqs[todo[0]].target)
      group = [i for i in todo[: self.batch_size] if len(reqs[i].target) == n]
      todo = todo[len(group) :]
      # generate needs room for the last target token as an input too: at the context limit,
      # decode from one token less of context.
      room = self.cfg.max_seq_len - n
      prompts = [list(reqs[i].context)[-room:] for i in group]
      res = generate(
        self.cfg, self.model.params, prompts, n, eos_id=self.sp.eos_id, mesh=self.model.mesh
      )
      for i, tokens in zip(group, res.tokens):
        out[i] = list(tokens) == list(reqs[i].target)
    return out

  def loglikelihood_rolling(
    self, requests: Sequence[Any], disable_tqdm: bool = False
  ) -> list[float]:
    """Total log p of each text, every token scored once in lm-eval's rolling windows."""
    windows, owners = [], []
    for i, req in enumerate(requests):
      (text,) = req.args
      pairs = lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text),
        prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length,
        context_len=1,
      )
      for context, target in map(lm_utils.make_disjoint_window, pairs):
        windows.append((None, context, target))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (lp, _) in zip(owners, self._loglikelihood_tokens(windows, greedy=False)):
      totals[i] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    """Generations cut at the first stop sequence, requests grouped by their settings."""
    from astrollama_jax.generation import generate

    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out: list[str] = [""] * len(requests)
    for idxs in groups.values():
      setting = self._generation_setting(requests[idxs[0]].args[1])
      until, max_new = setting.pop("until"), setting.pop("max_new_tokens")
      prompts = {
        i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
        for i in idxs
      }
      order = sorted(idxs, key=lambda i: -len(prompts[i]))
      for start in range(0, len(order), self.batch_size):
        batch = order[start : start + self.batch_size]
        res = generate(
          self.cfg,
          self.model.params,
          [prompts[i] for i in batch],
          max_new,
          eos_id=self.sp.eos_id,
          stop_strings=until,
          tokenizer=self.sp,
          mesh=self.model.mesh,
          seed=setting["seed"] + start,
          **setting["sampling"],
        )
        for i, text in zip(batch, res.texts):
          out[i] = postprocess_generated_text(text, until, None)
          self.cache_hook.add_partial("generate_until", requests[i].args[:2], out[i])
    return out

  def _generation_setting(self, gen_kwargs: dict) -> dict[str, Any]:
    """lm-eval's generation kwargs -> stop strings, token budget, sampling of ``generate``."""
    if not isinstance(gen_kwargs, dict):
      raise TypeError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    eos = self.sp.id_to_piece(self.eot_token_id)  # "</s>", as hf adds its EOS text
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_new = int(kwargs.pop("max_gen_toks"))
    if not 0 < max_new < self.max_length:
      raise ValueError(f"max_gen_toks {max_new} must be in [1, max_length={self.max_length})")
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    sampling = {
      "temperature": temperature if do_sample else 0.0,
      "top_k": int(kwargs.pop("top_k", 0) or 0),
      "top_p": float(kwargs.pop("top_p", 1.0) or 1.0),
    }
    seed = int(kwargs.pop("seed", 0) or 0)
    if kwargs:
      logging.warning("generation settings not used by astrollama: %s", sorted(kwargs))
    return {"until": until, "max_new_tokens": max_new, "sampling": sampling, "seed": seed}
