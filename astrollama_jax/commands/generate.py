"""``python -m astrollama_jax generate``: complete prompts (plain or chat) with any checkpoint.

  python -m astrollama_jax generate --checkpoint=runs/sft --chat --prompt="What is a blazar?"
  python -m astrollama_jax generate --checkpoint=hf/model --prompts_file=prompts.jsonl \
      --output=out.jsonl

Prompts run in batches through ``generation.generate``; with ``--output`` each batch's records are
written as it ends, so an interrupted run keeps what is done.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from typing import Any

from absl import app, flags, logging

from astrollama_jax.commands import cli
from astrollama_jax.data.chat_formats import Conversation
from astrollama_jax.errors import UserError
from astrollama_jax.generation import check_sampling, generate
from astrollama_jax.util import checks, tables


def define_flags() -> None:
  cli.define_sampling_flags(max_new_tokens=128)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
  flags.DEFINE_string(
    "prompts_file", None, "JSONL with a 'prompt' field per line (+ optional 'system')."
  )
  cli.define(
    "output",
    help={"output": "Write one JSONL record per prompt to this file (input fields + completion)."},
  )
  flags.DEFINE_bool("chat", False, "Wrap each prompt in the chat format (--chat_template).")
  flags.DEFINE_integer("batch_size", 8, "Prompts per generate call.")


def _read_prompts_file(path: str) -> list[dict[str, Any]]:
  """All records of a JSONL file, each with a string ``prompt``; errors name the line."""
  from astrollama_jax.eval.common import read_jsonl

  records = []
  for lineno, rec in read_jsonl(path):
    if not isinstance(rec.get("prompt"), str):
      raise ValueError(f"{path}:{lineno}: expected an object with a string field 'prompt'")
    records.append(rec)
  if not records:
    raise ValueError(f"{path}: no prompts")
  return records


def _short(text: str, n: int = 48) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[: n - 1] + "…"


def main(argv: Sequence[str]) -> None:
  cli.no_extra_args(argv)
  F = flags.FLAGS
  if bool(F.prompt) == bool(F.prompts_file):
    raise app.UsageError("give --prompt (repeatable) or --prompts_file, not both or neither")
  check_sampling(F.max_new_tokens, F.temperature, F.top_k, F.top_p)
  records = [{"prompt": p} for p in F.prompt] if F.prompt else _read_prompts_file(F.prompts_file)
  for i, r in enumerate(records):
    checks.check_text(r["prompt"], f"--prompt {i}")
  if F.output:
    checks.check_output_file(F.output)
  loaded = cli.load_from_flags(F)
  cfg, params, tokenizer, mesh = loaded.cfg, loaded.params, loaded.open_tokenizer(), loaded.mesh
  eos_id, stop_strings = tokenizer.stop_ids, list(F.stop)
  if F.chat:
    template = cli.chat_template_from_flags(F)
    ids = [
      template.prompt_ids(
        tokenizer, Conversation(turns=(("user", r["prompt"]),), system=r.get("system", F.system))
      )
      for r in records
    ]
    eos_id, stop_strings = template.stop_ids(tokenizer), [*template.stop_strings, *F.stop]
  else:
    ids = [tokenizer.encode(r["prompt"], bos=True) for r in records]
  for i, p in enumerate(ids):  # checked up front, so no batch fails after others were written
    if len(p) + F.max_new_tokens > cfg.max_seq_len:
      raise UserError(
        f"prompt {i} is {len(p)} tokens; with --max_new_tokens={F.max_new_tokens} it "
        f"exceeds the model's context of {cfg.max_seq_len}"
      )

  out_file = open(F.output, "w", encoding="utf-8") if F.output else None
  rows, total_tokens, seconds, reasons = [], 0, 0.0, {}
  try:
    for start in range(0, len(ids), F.batch_size):
      batch = ids[start : start + F.batch_size]
      res = generate(
        cfg,
        params,
        batch,
        F.max_new_tokens,
        temperature=F.temperature,
        top_k=F.top_k,
        top_p=F.top_p,
        seed=F.seed + start,
        eos_id=eos_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        mesh=mesh,
      )
      seconds += res.seconds
      for k, (text, toks, why) in enumerate(zip(res.texts, res.tokens, res.finish_reasons)):
        rec = {
          **records[start + k],
          "completion": text,
          "num_tokens": len(toks),
          "finish_reason": why,
        }
        total_tokens += len(toks)
        reasons[why] = reasons.get(why, 0) + 1
        rows.append(rec)
        if out_file:  # written as each batch ends: an interrupted run keeps what is done
          out_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
          print(f"### prompt {start + k}\n{rec['prompt']}\n### completion\n{text}\n", flush=True)
      if out_file:
        out_file.flush()
      logging.info("%d/%d prompts done", min(start + F.batch_size, len(ids)), len(ids))
  finally:
    if out_file:
      out_file.close()

  summary = {
    "prompts": len(rows),
    "generated_tokens": total_tokens,
    "seconds": round(seconds, 3),
    "tokens_per_s": round(total_tokens / max(seconds, 1e-9), 2),
    "finish_reasons": reasons,
    "output": F.output,
  }
  table = [
    {
      "#": i,
      "tokens": r["num_tokens"],
      "finish": r["finish_reason"],
      "prompt": _short(r["prompt"]),
      "completion": _short(r["completion"]),
    }
    for i, r in enumerate(rows)
  ]
  tables.report("generated", summary, table)
