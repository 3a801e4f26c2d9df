"""Files the package ships beside its code: the job configs and the demo data.

In a checkout (and an editable install) they are the repository's top-level ``configs/`` and
``data/`` folders. A built wheel carries the same folders inside the package, as
``astrollama_jax/configs`` and ``astrollama_jax/demo_data`` (``setup.py`` maps them), so an
installed ``astrollama-demo`` runs from any folder.
"""

from __future__ import annotations

import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # astrollama_jax/
# kind -> (inside an installed wheel, in a checkout)
_PLACES = {
  "configs": (PACKAGE / "configs", PACKAGE.parent / "configs"),
  "data": (PACKAGE / "demo_data", PACKAGE.parent / "data"),
}


def path(kind: str, *parts: str) -> pathlib.Path:
  """``configs/...`` or ``data/...`` as shipped; raises ``FileNotFoundError`` naming both places."""
  if kind not in _PLACES:
    raise KeyError(f"unknown resource kind {kind!r}; one of {sorted(_PLACES)}")
  for base in _PLACES[kind]:
    candidate = base.joinpath(*parts)
    if candidate.exists():
      return candidate
  raise FileNotFoundError(
    f"{'/'.join((kind,) + parts)} is neither in the installed package nor in "
    f"a checkout ({', '.join(str(b) for b in _PLACES[kind])})"
  )


def checkout() -> pathlib.Path | None:
  """The repository root when running from a checkout, else None (an installed wheel)."""
  root = PACKAGE.parent
  return root if (root / "setup.py").is_file() and (root / "configs").is_dir() else None
