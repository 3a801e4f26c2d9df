"""The LLaMA-2 chat format, as token ids, identical to what Hugging Face produces.

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s><s>[INST] {user2} [/INST] ...

Why ids are built per exchange: HF renders ``LLAMA2_CHAT_TEMPLATE`` to text and tokenizes it,
splitting at the special tokens ``<s>``/``</s>``; each piece between them,
``"[INST] {user} [/INST] {reply} "``, is then encoded on its own with a leading "▁" (the LLaMA
``legacy`` behaviour, also Meta's reference code). Encoding each exchange with SentencePiece is
therefore the same computation, and knowing the exchange boundaries gives us the loss mask for free.

``write_hf_tokenizer_files`` writes the tokenizer folder the exporter ships, configured so that
``AutoTokenizer`` reproduces SentencePiece: merges ranked by SentencePiece score (whitespace-only
pieces last), legacy prefixing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Sequence

import numpy as np
import sentencepiece as spm

from astrollama_jax.data.chat_formats import ChatFormatError, Conversation
from astrollama_jax.data.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# The Llama-2-chat format as a Jinja chat template (transformers' ``apply_chat_template``).
# Content is stripped; the system prompt is folded into the first user message.
LLAMA2_CHAT_TEMPLATE = (
  "{%- if messages and messages[0]['role'] == 'system' -%}"
  "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
  "{%- else -%}"
  "{%- set system = none -%}{%- set turns = messages -%}"
  "{%- endif -%}"
  "{%- for m in turns -%}"
  "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
  "{{- raise_exception('Conversation roles must alternate user/assistant/user/... starting with user') -}}"
  "{%- endif -%}"
  "{%- if m['role'] == 'user' -%}"
  "{%- set text = m['content'] -%}"
  "{%- if loop.first and system is not none -%}"
  "{%- set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text -%}"
  "{%- endif -%}"
  "{{- bos_token + '[INST] ' + text.strip() + ' [/INST]' -}}"
  "{%- else -%}"
  "{{- ' ' + m['content'].strip() + ' ' + eos_token -}}"
  "{%- endif -%}"
  "{%- endfor -%}"
)


def user_content(user: str, system: str | None, first: bool) -> str:
  """The text between ``[INST] `` and `` [/INST]``, exactly as the template builds it."""
  text = f"{B_SYS}{system}{E_SYS}{user}" if first and system is not None else user
  return text.strip()


def encode_exchange(
  tokenizer: Tokenizer, user: str, reply: str | None
) -> tuple[list[int], list[int]]:
  """Ids of ``<s>[INST] {user} [/INST] {reply} </s>`` and a 0/1 mask marking the reply and its EOS.

  ``user`` is the already-built user content (``user_content``). With ``reply=None`` this is the
  generation prompt ``<s>[INST] {user} [/INST]`` (mask all 0).
  """
  prompt = tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True)
  if reply is None:
    return prompt, [0] * len(prompt)
  full = tokenizer.encode(f"{B_INST} {user} {E_INST} {reply.strip()} ", bos=True, eos=True)
  # The reply starts after a space, so SentencePiece never merges across "[/INST]"; the prompt is a
  # prefix of the full ids. Should a piece ever straddle the boundary, it counts as reply.
  n = 0
  while n < len(prompt) and full[n] == prompt[n]:
    n += 1
  return full, [0] * n + [1] * (len(full) - n)


def encode_conversation(
  tokenizer: Tokenizer, conversation: Conversation, max_ids: int | None = None
) -> tuple[list[int], list[int]]:
  """Ids and reply mask of a whole conversation, keeping whole exchanges within ``max_ids`` ids.

  Trailing exchanges that do not fit are dropped, never cut mid-reply; raises ``ChatFormatError``
  if the first one alone does not fit.
  """
  ids: list[int] = []
  mask: list[int] = []
  for k, (user, reply) in enumerate(conversation.exchanges):
    e_ids, e_mask = encode_exchange(
      tokenizer, user_content(user, conversation.system, k == 0), reply
    )
    if max_ids is not None and len(ids) + len(e_ids) > max_ids:
      if k == 0:
        raise ChatFormatError("first exchange too long", f"{len(e_ids)} ids > {max_ids}")
      break
    ids += e_ids
    mask += e_mask
  return ids, mask


def encode_for_training(
  tokenizer: Tokenizer, conversation: Conversation, seq_len: int | None = None
) -> dict[str, np.ndarray]:
  """``{tokens, targets, loss_mask}`` for next-token training on the assistant replies only.

  tokens = ids[:-1], targets = ids[1:]; loss_mask is 1.0 where the target is a reply token or the
  EOS closing a reply. ``seq_len`` bounds len(tokens) (so at most seq_len + 1 ids are kept).
  """
  turns = conversation.turns[: len(conversation.turns) // 2 * 2]  # a final user turn has no reply
  if not turns:
    raise ChatFormatError("no assistant reply")
  conversation = dataclasses.replace(conversation, turns=turns)
  ids, mask = encode_conversation(tokenizer, conversation, None if seq_len is None else seq_len + 1)
  return {
    "tokens": np.asarray(ids[:-1], np.int32),
    "targets": np.asarray(ids[1:], np.int32),
    "loss_mask": np.asarray(mask[1:], np.float32),
  }


def build_prompt_ids(conversation: Conversation, tokenizer: Tokenizer) -> list[int]:
  """Ids for generation: the history plus ``<s>[INST] {last user turn} [/INST]``.

  ``conversation`` must end with the user turn to be answered. Equal to
  ``apply_chat_template(conversation.to_messages(), tokenize=True)``.
  """
  if not conversation.turns or conversation.turns[-1][0] != "user":
    raise ValueError("build_prompt_ids needs a conversation that ends with a user turn")
  ids, _ = encode_conversation(tokenizer, conversation)
  return ids


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer folder


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
) -> list[str]:
  """Write a Hugging Face tokenizer folder for our SentencePiece model, with the chat template.

  Files: tokenizer.model (copy), tokenizer.json, tokenizer_config.json, special_tokens_map.json.
  ``AutoTokenizer.from_pretrained(output_dir)`` then encodes like ``Tokenizer`` (BOS added, no EOS)
  and ``apply_chat_template`` gives the ids of ``encode_conversation``. Returns the written paths.

  Known gap: transformers 5's LlamaTokenizer does not prepend "▁" to a text that already starts
  with a space, SentencePiece does; chat content is stripped so the chat format is unaffected.
  """
  output_dir = os.fspath(output_dir)
  tokenizer_model_path = os.fspath(tokenizer_model_path)
  if not os.path.isfile(tokenizer_model_path):
    raise FileNotFoundError(f"tokenizer model not found: {tokenizer_model_path}")
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
    "chat_template": LLAMA2_CHAT_TEMPLATE,
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


def decode_reply(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  """Text of generated reply ids, cut at the first EOS."""
  ids = list(ids)
  if tokenizer.eos_id in ids:
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids).strip()
