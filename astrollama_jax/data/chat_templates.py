"""Chat templates: how a conversation becomes token ids, one value per chat format.

A ``ChatTemplate`` holds what differs between chat formats: how one exchange (a user message and
its reply, if any) becomes ids and which of them carry the SFT loss, the id and strings that end a
generated reply, and the Jinja string an exported HF folder ships (``tokenizer_config.json``
``chat_template``) so that transformers' ``apply_chat_template`` gives the same ids. What is the
same for every format is built here once from those parts: a whole conversation kept to whole
exchanges, the training example, the generation prompt, the decoded reply.

``TEMPLATES`` lists them by name; ``choose`` picks one: a flag or a config value, else the one a
checkpoint records, else its tokenizer's family's (``for_tokenizer``). Training,
``generate --chat``, ``chat``, ``serve`` and ``export`` all take the chosen value, so a new
format is one new entry in ``TEMPLATES``.

LLaMA-2's format (``LLAMA2``)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s>
    <s>[INST] {user2} [/INST] ...   (one line: the break is only for reading)

Why its ids are built per exchange: HF renders ``LLAMA2_JINJA`` to text and tokenizes it,
splitting at the special tokens ``<s>``/``</s>``; each piece between them,
``"[INST] {user} [/INST] {reply} "``, is then encoded on its own with a leading "▁" (the LLaMA
``legacy`` behaviour, also Meta's reference code). Encoding each exchange with SentencePiece is
therefore the same computation, and knowing the exchange boundaries gives the loss mask for free.

LLaMA 3's format (``LLAMA3``), one ``<|begin_of_text|>`` then per message::

    <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>

with the generation prompt ``<|start_header_id|>assistant<|end_header_id|>\n\n``. Its special
ids come from the tokenizer; a reply ends at ``<|eot_id|>``, generation at any of the family's end
ids (``Tokenizer.stop_ids``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses

import numpy as np

from astrollama_jax.data.chat_formats import ChatFormatError, Conversation
from astrollama_jax.data.tokenizer import Tokenizer

# (tokenizer, user, reply or None, system or None, first exchange?) -> (ids, 0/1 reply mask)
ExchangeEncoder = Callable[
  [Tokenizer, str, str | None, str | None, bool], tuple[list[int], list[int]]
]


def _eos_id(tokenizer: Tokenizer) -> int:
  return tokenizer.eos_id


def _eot_id(tokenizer: Tokenizer) -> int:
  return tokenizer.eot_id


def _family_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  return tokenizer.stop_ids


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """One chat format. Build ids through the methods; the fields are the format's parts.

  ``encode_exchange(tokenizer, user, reply, system, first)`` gives the ids of one exchange and a
  0/1 mask that is 1 on the reply and the token closing it (what SFT trains on); with
  ``reply=None`` it is the generation prompt (mask all 0). ``system`` is the conversation's
  system prompt, passed to every exchange; ``first`` says whether this exchange opens the
  conversation (where formats put the system prompt). ``stop_id_of(tokenizer)`` is the id that
  closes a reply, ``stop_ids_of(tokenizer)`` every id that ends generation (default: that one),
  ``stop_strings`` texts that end one too; ``jinja`` is the same format as a transformers chat
  template.
  """

  name: str
  encode_exchange: ExchangeEncoder
  jinja: str
  stop_id_of: Callable[[Tokenizer], int] = _eos_id
  stop_strings: tuple[str, ...] = ()
  stop_ids_of: Callable[[Tokenizer], tuple[int, ...]] | None = None

  def stop_id(self, tokenizer: Tokenizer) -> int:
    """The id that closes a reply in this format (what SFT puts after each reply)."""
    return self.stop_id_of(tokenizer)

  def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Every id generation stops at, ``stop_id`` among them."""
    if self.stop_ids_of is None:
      return (self.stop_id(tokenizer),)
    return tuple(dict.fromkeys((self.stop_id(tokenizer), *self.stop_ids_of(tokenizer))))

  def encode_conversation(
    self, tokenizer: Tokenizer, conversation: Conversation, max_ids: int | None = None
  ) -> tuple[list[int], list[int]]:
    """Ids and reply mask of a whole conversation, keeping whole exchanges within ``max_ids`` ids.

    Trailing exchanges that do not fit are dropped, never cut mid-reply; raises
    ``ChatFormatError`` if the first one alone does not fit.
    """
    ids: list[int] = []
    mask: list[int] = []
    for k, (user, reply) in enumerate(conversation.exchanges):
      e_ids, e_mask = self.encode_exchange(tokenizer, user, reply, conversation.system, k == 0)
      if max_ids is not None and len(ids) + len(e_ids) > max_ids:
        if k == 0:
          raise ChatFormatError("first exchange too long", f"{len(e_ids)} ids > {max_ids}")
        break
      ids += e_ids
      mask += e_mask
    return ids, mask

  def encode_for_training(
    self, tokenizer: Tokenizer, conversation: Conversation, seq_len: int | None = None
  ) -> dict[str, np.ndarray]:
    """``{tokens, targets, loss_mask}`` for next-token training on the assistant replies only.

    tokens = ids[:-1], targets = ids[1:]; loss_mask is 1.0 where the target is a reply token or
    the token closing a reply. ``seq_len`` bounds len(tokens) (at most seq_len + 1 ids are kept).
    """
    turns = conversation.turns[: len(conversation.turns) // 2 * 2]  # a last user turn: no reply
    if not turns:
      raise ChatFormatError("no assistant reply")
    conversation = dataclasses.replace(conversation, turns=turns)
    ids, mask = self.encode_conversation(
      tokenizer, conversation, None if seq_len is None else seq_len + 1
    )
    return {
      "tokens": np.asarray(ids[:-1], np.int32),
      "targets": np.asarray(ids[1:], np.int32),
      "loss_mask": np.asarray(mask[1:], np.float32),
    }

  def prompt_ids(self, tokenizer: Tokenizer, conversation: Conversation) -> list[int]:
    """Ids for generation: the history, then the last user turn as a generation prompt.

    ``conversation`` must end with the user turn to be answered. Equal to
    ``apply_chat_template(conversation.to_messages(), add_generation_prompt=True)`` with
    ``jinja``.
    """
    if not conversation.turns or conversation.turns[-1][0] != "user":
      raise ValueError("a generation prompt needs a conversation that ends with a user turn")
    ids, _ = self.encode_conversation(tokenizer, conversation)
    return ids

  def decode_reply(self, tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Text of generated reply ids, cut at the first of the stop ids."""
    ids = list(ids)
    stops = set(self.stop_ids(tokenizer))
    cut = next((k for k, i in enumerate(ids) if i in stops), len(ids))
    return tokenizer.decode(ids[:cut]).strip()


# --- LLaMA-2 ---------------------------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# The Llama-2-chat format as a Jinja chat template (transformers' ``apply_chat_template``).
# Content is stripped; the system prompt is folded into the first user message.
LLAMA2_JINJA = (
  "{%- if messages and messages[0]['role'] == 'system' -%}"
  "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
  "{%- else -%}"
  "{%- set system = none -%}{%- set turns = messages -%}"
  "{%- endif -%}"
  "{%- for m in turns -%}"
  "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
  "{{- raise_exception('Conversation roles must alternate user/assistant/user/... "
  "starting with user') -}}"
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


def _llama2_exchange(
  tokenizer: Tokenizer, user: str, reply: str | None, system: str | None, first: bool
) -> tuple[list[int], list[int]]:
  """``<s>[INST] {user} [/INST] {reply} </s>``, the system prompt folded into the first user turn.

  With ``reply=None`` this is the generation prompt ``<s>[INST] {user} [/INST]``.
  """
  if first and system is not None:
    user = f"{B_SYS}{system}{E_SYS}{user}"
  user = user.strip()
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


LLAMA2 = ChatTemplate(name="llama2", encode_exchange=_llama2_exchange, jinja=LLAMA2_JINJA)

# --- LLaMA 3 ---------------------------------------------------------------------------------

# The LLaMA 3 Instruct format as a Jinja chat template: one begin-of-text, then per message
# ``<|start_header_id|>{role}<|end_header_id|>\n\n{content, trimmed}<|eot_id|>``; the generation
# prompt opens an assistant header. Renders as Meta's template does (tested against it).
LLAMA3_JINJA = (
  "{%- for m in messages -%}"
  "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
  "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' -}}"
  "{{- m['content'] | trim -}}"
  "{{- '<|eot_id|>' -}}"
  "{%- endfor -%}"
  "{%- if add_generation_prompt -%}"
  "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
  "{%- endif -%}"
)


def _llama3_block(tokenizer: Tokenizer, role: str) -> list[int]:
  """``<|start_header_id|>{role}<|end_header_id|>``: the header before each message."""
  return [
    tokenizer.special_id("<|start_header_id|>"),
    *tokenizer.encode(role, bos=False),
    tokenizer.special_id("<|end_header_id|>"),
  ]


def _llama3_message(tokenizer: Tokenizer, role: str, text: str) -> list[int]:
  body = tokenizer.encode("\n\n" + text.strip(), bos=False)
  return _llama3_block(tokenizer, role) + body + [tokenizer.special_id("<|eot_id|>")]


def _llama3_exchange(
  tokenizer: Tokenizer, user: str, reply: str | None, system: str | None, first: bool
) -> tuple[list[int], list[int]]:
  """``[<|begin_of_text|>][system message]`` user message, assistant header, reply, end of turn.

  HF tokenizes the rendered text split at the special tokens, each piece on its own; encoding
  each piece here is the same computation. The mask is 1 on the reply and its ``<|eot_id|>``.
  With ``reply=None`` it is the generation prompt, ending in the assistant header and "\n\n".
  """
  ids = [tokenizer.bos_id] if first else []
  if first and system is not None:
    ids += _llama3_message(tokenizer, "system", system)
  ids += _llama3_message(tokenizer, "user", user) + _llama3_block(tokenizer, "assistant")
  opening = tokenizer.encode("\n\n", bos=False)
  if reply is None:
    ids += opening
    return ids, [0] * len(ids)
  body = tokenizer.encode("\n\n" + reply.strip(), bos=False)
  # "\n\n" is its own pre-token before stripped text; should it ever merge, it counts as reply.
  n = 0
  while n < min(len(opening), len(body)) and body[n] == opening[n]:
    n += 1
  mask = [0] * (len(ids) + n) + [1] * (len(body) - n + 1)
  return ids + body + [tokenizer.special_id("<|eot_id|>")], mask


LLAMA3 = ChatTemplate(
  name="llama3",
  encode_exchange=_llama3_exchange,
  jinja=LLAMA3_JINJA,
  stop_id_of=_eot_id,
  stop_ids_of=_family_stop_ids,
)

# --- the registry ----------------------------------------------------------------------------

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (LLAMA2, LLAMA3)}
DEFAULT = "llama2"  # the format of a tokenizer without LLaMA 3's header tokens


def get(name: str) -> ChatTemplate:
  """The template called ``name``, or a ``ValueError`` naming the known ones."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
  return TEMPLATES[name]


def for_tokenizer(tokenizer: Tokenizer | str | None) -> ChatTemplate:
  """The chat format of a tokenizer's family: LLaMA 3's if it has the header tokens (a LLaMA 3
  base model has them too, untrained), else ``DEFAULT``."""
  if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
    tokenizer = Tokenizer(tokenizer)
  if tokenizer is not None and tokenizer.token_id("<|start_header_id|>") is not None:
    return LLAMA3
  return get(DEFAULT)


def choose(
  name: str | None = None,
  *,
  recorded: str | None = None,
  tokenizer: Tokenizer | str | None = None,
) -> ChatTemplate:
  """The template to use: ``name`` (a flag or config value) if given, else the one a checkpoint
  ``recorded`` (``checkpoints.loader.recorded_chat_template``), else the family's of
  ``tokenizer`` (a ``Tokenizer`` or its path), else ``DEFAULT``."""
  if name or recorded:
    return get(name or recorded)
  return for_tokenizer(tokenizer)


def by_jinja(jinja: str | None) -> ChatTemplate | None:
  """The template whose Jinja string is ``jinja`` (how an exported HF folder records it)."""
  return next((t for t in TEMPLATES.values() if jinja and t.jinja == jinja), None)
