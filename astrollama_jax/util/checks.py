"""Up-front checks of user-named text and output paths: fail before any work is done."""

from __future__ import annotations

import os

from astrollama_jax.errors import UserError


def check_text(text: str, where: str) -> str:
  """``text``, or a ``UserError`` naming ``where`` if it cannot be encoded (a lone surrogate)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UserError(
      f"{where}: text that cannot be encoded as UTF-8 ({e.reason} at character {e.start})"
    ) from None
  return text


def check_output_file(path: str, flag: str = "--output") -> None:
  """Fail before any work if ``path`` cannot be written as a file; ``flag`` names it."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise UserError(f"{flag} {path} is a folder; give a file path")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UserError(f"{flag} {path} is not writable")


def check_output_dir(path: str, empty: bool = True, flag: str = "--output") -> None:
  """Fail before any work if ``path`` cannot be created or written as a folder (or, with
  ``empty``, already holds files); ``flag`` names it in the message."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag} {path} is a file; give a folder")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK):
    raise UserError(f"{flag} {path} is not writable")
  if empty and os.path.isdir(path) and os.listdir(path):
    raise UserError(f"{flag} {path} is not empty")
