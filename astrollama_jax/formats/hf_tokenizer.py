"""The Hugging Face tokenizer folder for our tokenizer, with a chat template.

``write_hf_tokenizer_files`` writes what the exporter ships beside the weights. For a SentencePiece
model (LLaMA-2) it is configured so that ``AutoTokenizer`` reproduces SentencePiece: merges ranked
by SentencePiece score (whitespace-only pieces last), legacy prefixing. A byte-level BPE (LLaMA 3)
ships its own ``tokenizer.json``; Meta's tiktoken ``tokenizer.model`` is turned into one by
transformers' ``TikTokenConverter`` with LLaMA 3's pre-tokenizer and 256 special tokens, adding
``<|begin_of_text|>`` as the released ``tokenizer.json`` does. Either way
``tokenizer_config.json`` carries the chat template's Jinja string, so ``apply_chat_template``
gives the ids ``ChatTemplate.encode_conversation`` does, and ``write_generation_ids`` puts the
tokenizer's own begin/end ids in ``generation_config.json`` and ``config.json``.
"""

from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm

from astrollama_jax.data import tokenizer as tokenizers_
from astrollama_jax.data.chat_templates import LLAMA2, ChatTemplate


def _bpe_vocab_and_merges(sp: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[str]]:
  """The SentencePiece BPE model as a ``tokenizers`` BPE: merges ranked like SentencePiece ranks.

  SentencePiece merges the pair whose result has the highest score (whitespace-only pieces have
  score -1e9, so runs of spaces merge last); ties go to the lower id. Ranking merges by
  (score desc, id) makes the HF BPE take the same path, e.g. for indented code.
  """
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  merges = []
  for i in range(sp.get_piece_size()):
    if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i):
      continue
    piece = sp.id_to_piece(i)
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in vocab and right in vocab:
        merges.append((-sp.get_score(i), i, f"{left} {right}"))
  merges.sort()
  return vocab, [m for _, _, m in merges]


def _tokenizer_json(sp: spm.SentencePieceProcessor) -> dict:
  vocab, merges = _bpe_vocab_and_merges(sp)
  specials = [
    (sp.unk_id(), sp.id_to_piece(sp.unk_id())),
    (sp.bos_id(), sp.id_to_piece(sp.bos_id())),
    (sp.eos_id(), sp.id_to_piece(sp.eos_id())),
  ]
  bos = sp.id_to_piece(sp.bos_id())
  seq = lambda name, type_id: {"Sequence": {"id": name, "type_id": type_id}}
  tok = lambda type_id: {"SpecialToken": {"id": bos, "type_id": type_id}}
  return {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [
      {
        "id": i,
        "content": p,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
      }
      for i, p in specials
    ],
    # Legacy LLaMA layout: "▁" before every segment, spaces as "▁", no pre-tokenizer.
    "normalizer": {
      "type": "Sequence",
      "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
      ],
    },
    "pre_tokenizer": None,
    "post_processor": {
      "type": "TemplateProcessing",
      "single": [tok(0), seq("A", 0)],
      "pair": [tok(0), seq("A", 0), tok(1), seq("B", 1)],
      "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
    },
    "decoder": {
      "type": "Sequence",
      "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
      ],
    },
    "model": {
      "type": "BPE",
      "dropout": None,
      "unk_token": sp.id_to_piece(sp.unk_id()),
      "continuing_subword_prefix": None,
      "end_of_word_suffix": None,
      "fuse_unk": True,
      "byte_fallback": True,
      "ignore_merges": False,
      "vocab": vocab,
      "merges": merges,
    },
  }


def write_hf_tokenizer_files(
  output_dir: str | os.PathLike,
  tokenizer_model_path: str | os.PathLike,
  model_max_length: int = 4096,
  chat_template: ChatTemplate = LLAMA2,
) -> list[str]:
  """Write a Hugging Face tokenizer folder for our SentencePiece model, with ``chat_template``.

  Files: tokenizer.model (copy), tokenizer.json, tokenizer_config.json, special_tokens_map.json.
  ``AutoTokenizer.from_pretrained(output_dir)`` then encodes like ``Tokenizer`` (BOS added, no EOS)
  and ``apply_chat_template`` gives the ids of ``chat_template.encode_conversation``. Returns the
  written paths.

  Known gap: transformers 5's LlamaTokenizer does not prepend "▁" to a text that already starts
  with a space, SentencePiece does; chat content is stripped so the chat format is unaffected.
  """
  output_dir = os.fspath(output_dir)
  kind, tokenizer_model_path = tokenizers_.detect(tokenizer_model_path)
  if kind != tokenizers_.SENTENCEPIECE:
    return _write_bpe_files(output_dir, tokenizer_model_path, kind, model_max_length, chat_template)
  sp = spm.SentencePieceProcessor(model_file=tokenizer_model_path)
  if sp.pad_id() >= 0:
    raise ValueError(
      f"{tokenizer_model_path}: has a pad piece; this writer expects LLaMA-2's (none)"
    )
  os.makedirs(output_dir, exist_ok=True)
  unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
  special = lambda p: {
    "content": p,
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
    "special": True,
  }
  config = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "add_prefix_space": True,
    "legacy": True,  # "▁" before every segment, incl. after <s>: Meta's encoding of "[INST]"
    "bos_token": bos,
    "eos_token": eos,
    "unk_token": unk,
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "model_max_length": int(model_max_length),
    "padding_side": "right",
    "sp_model_kwargs": {},
    "use_default_system_prompt": False,
    "added_tokens_decoder": {
      str(i): special(p) for i, p in ((sp.unk_id(), unk), (sp.bos_id(), bos), (sp.eos_id(), eos))
    },
    "chat_template": chat_template.jinja,
  }
  special_map = {"bos_token": special(bos), "eos_token": special(eos), "unk_token": special(unk)}
  paths = [
    os.path.join(output_dir, n)
    for n in (
      "tokenizer.model",
      "tokenizer.json",
      "tokenizer_config.json",
      "special_tokens_map.json",
    )
  ]
  if os.path.abspath(tokenizer_model_path) != os.path.abspath(paths[0]):
    shutil.copyfile(tokenizer_model_path, paths[0])
  for path, obj in zip(paths[1:], (_tokenizer_json(sp), config, special_map)):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=None if path.endswith("tokenizer.json") else 2)
  return paths


def _write_bpe_files(
  output_dir: str, path: str, kind: str, model_max_length: int, chat_template: ChatTemplate
) -> list[str]:
  """A byte-level BPE's folder: its tokenizer.json as is, with our config and chat template.

  The end of sequence is the chat template's end of a reply for a chat format that ends replies
  otherwise than documents (LLaMA 3 Instruct's ``<|eot_id|>``), else the end of text.
  """
  os.makedirs(output_dir, exist_ok=True)
  if kind == tokenizers_.TIKTOKEN:
    path = tiktoken_to_tokenizer_json(path, os.path.join(output_dir, "tokenizer.json"))
  tok = tokenizers_.Tokenizer(path)
  with open(path, encoding="utf-8") as f:
    added = json.load(f).get("added_tokens", [])
  try:
    eos_id = chat_template.stop_id(tok)
  except ValueError:  # a template whose special tokens this tokenizer lacks
    eos_id = tok.eos_id
  bos, eos = tok.id_to_piece(tok.bos_id), tok.id_to_piece(eos_id)
  keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": bos,
    "eos_token": eos,
    "clean_up_tokenization_spaces": False,
    "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": int(model_max_length),
    "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added},
    "chat_template": chat_template.jinja,
  }
  paths = [os.path.join(output_dir, n) for n in ("tokenizer.json", "tokenizer_config.json")]
  paths.append(os.path.join(output_dir, "special_tokens_map.json"))
  if os.path.abspath(path) != os.path.abspath(paths[0]):
    shutil.copyfile(path, paths[0])
  for p, obj in zip(paths[1:], (config, {"bos_token": bos, "eos_token": eos})):
    with open(p, "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=2)
  return paths


def tiktoken_to_tokenizer_json(path: str, out: str) -> str:
  """Write Meta's LLaMA 3 ``tokenizer.model`` (tiktoken ranks) as an HF ``tokenizer.json``."""
  from tokenizers import processors
  from transformers.convert_slow_tokenizer import TikTokenConverter

  tok = TikTokenConverter(
    path, pattern=tokenizers_.PATTERN, extra_special_tokens=list(tokenizers_.SPECIAL_TOKENS)
  ).converted()
  bos = tokenizers_.BEGIN_OF_TEXT
  tok.post_processor = processors.Sequence(
    [
      processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
      processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
      ),
    ]
  )
  tok.save(out)
  return out


def write_generation_ids(output_dir: str | os.PathLike, tokenizer_path: str | os.PathLike) -> None:
  """Set the begin, end and pad ids of ``generation_config.json`` (and of ``config.json``, where
  written) from the tokenizer itself, not from one family's constants.

  The end ids are the family's (LLaMA 3.1: end of text, eom, eot), one int where there is one.
  """
  tok = tokenizers_.Tokenizer(tokenizer_path)
  stops = list(tok.stop_ids)
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
  for name, extra in (
    ("generation_config.json", {"pad_token_id": tok.pad_id}),
    ("config.json", {}),
  ):
    path = os.path.join(os.fspath(output_dir), name)
    if name == "config.json" and not os.path.isfile(path):
      continue
    config = {}
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(ids, **extra)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)


def write_tokenizer_folder(
  output_dir: str | os.PathLike,
  tokenizer_path: str | os.PathLike,
  max_seq_len: int,
  chat_template: ChatTemplate,
) -> list[str]:
  """Every tokenizer file an exported HF folder carries: the tokenizer with ``chat_template``'s
  Jinja, and the generation ids (``save_hf``'s ``extra_files``)."""
  files = write_hf_tokenizer_files(output_dir, tokenizer_path, max_seq_len, chat_template)
  write_generation_ids(output_dir, tokenizer_path)
  return files
