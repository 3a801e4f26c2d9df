"""How a stored pytree differs from this run's: the first leaf whose path, shape or dtype differs.

A restore compares the checkpoint's Orbax metadata with the run's state before reading anything,
so an incompatible checkpoint is named in one line and never mistaken for a corrupt one.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def _path_key(path: tuple[Any, ...]) -> str:
  """A tree path as ``a/b/0``, the same for a live pytree and for Orbax's metadata of it."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  return {
    _path_key(p): (tuple(x.shape), str(np.dtype(x.dtype)))
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    if hasattr(x, "shape")
  }


def tree_difference(stored: Any, target: Any) -> str | None:
  """The first difference of shapes/dtypes/leaves between a stored tree and this run's, or None."""
  a, b = _leaves(stored), _leaves(target)
  for key in sorted(set(a) | set(b)):
    if key not in b:
      return f"{key} is in the checkpoint, not in this run"
    if key not in a:
      return f"{key} is in this run, not in the checkpoint"
    if a[key] != b[key]:
      (sa, da), (sb, db) = a[key], b[key]
      return f"{key} is {da}{list(sa)} in the checkpoint, {db}{list(sb)} in this run"
  return None
