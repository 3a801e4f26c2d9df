"""Meshes and logical-axis sharding rules.

Sharding is data, not code: every parameter and large activation names its dimensions with
logical axes (``vocab``, ``embed``, ``heads`` ...), and a rules table maps those onto the mesh
axes ``data``, ``fsdp`` and ``tensor``. The same model code then runs on one CPU, eight fake
CPU devices, a GPU host or a TPU pod.

One table is in force at a time (``use_rules``; ``RULES`` by default, a run's comes from its
config's ``sharding_rules``): parameter shardings, batch shardings and the activation
constraints inside the model all read it, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import functools
import math
from typing import Any

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from astrollama_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: tuple[tuple[str, Any], ...] = (
  # parameters
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("norm", None),
  ("lora_rank", None),  # LoRA adapters' low-rank axis (tiny: replicated)
  # activations
  ("batch", ("data", "fsdp")),
  ("seq", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("cache_seq", None),
)
Rules = Sequence[tuple[str, Any]]
_ACTIVE: list[Rules] = [RULES]


def current_rules() -> Rules:
  """The table in force (the innermost ``use_rules``; ``RULES`` outside any)."""
  return _ACTIVE[-1]


@contextlib.contextmanager
def use_rules(rules: Rules | None) -> Iterator[Rules]:
  """Make ``rules`` the table for everything inside (``None``: keep the current one).

  Shardings are computed and models traced inside it; a jitted function traced here keeps the
  table it was traced with.
  """
  rules = current_rules() if rules is None else tuple(rules)
  _ACTIVE.append(rules)
  try:
    yield rules
  finally:
    _ACTIVE.pop()


def keeping_rules(fn: Any) -> Any:
  """``fn`` that always runs (is traced) with the table in force now, not at call time."""
  rules = current_rules()

  @functools.wraps(fn)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    with use_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def rules_to_config(rules: Rules = RULES) -> dict[str, str]:
  """The table as config values: mesh axes joined by commas, '' for replicated."""
  return {
    name: ",".join((target,) if isinstance(target, str) else tuple(target or ()))
    for name, target in rules
  }


def rules_from_config(table: Mapping[str, str], where: str = "sharding_rules") -> Rules:
  """``rules_to_config``'s form back to a table, every name and mesh axis checked."""
  known = {name for name, _ in RULES}
  out = []
  for name, text in table.items():
    if name not in known:
      raise ValueError(f"{where}.{name}: no such logical axis; logical axes: {sorted(known)}")
    axes = tuple(a.strip() for a in str(text or "").split(",") if a.strip())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise ValueError(
        f"{where}.{name} = {text!r}: give distinct mesh axes of {MESH_AXES}, "
        "comma-separated ('' = replicated)"
      )
    out.append((name, axes[0] if len(axes) == 1 else (axes or None)))
  missing = known - {name for name, _ in out}
  if missing:
    raise ValueError(f"{where} lacks logical axes {sorted(missing)}")
  return tuple(out)


def make_mesh(
  shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry may be -1 for 'the rest of the devices'.

  Axis types are Auto so that ``with_sharding_constraint`` and jit shardings compose
  (``jax.make_mesh`` defaults to Explicit axes).
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
  try:
    from jax.experimental import mesh_utils

    dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - CPU or an odd topology: plain order is fine
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical: Sequence[str | None], rules: Rules | None = None) -> P:
  """Translate logical axis names into a mesh PartitionSpec (each mesh axis used once)."""
  table = dict(current_rules() if rules is None else rules)
  used: set[str] = set()
  out = []
  for name in logical:
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "") -> P:
  """Replicate any dimension the mesh cannot split evenly (with a warning)."""
  fixed = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      logging.warning(
        "%s: dimension %d not divisible by mesh axes %s (%d); replicating it",
        what,
        dim,
        names,
        size,
      )
      fixed.append(None)
    else:
      fixed.append(axes)
  return P(*fixed)


def named_sharding(
  mesh: Mesh,
  logical: Sequence[str | None],
  shape: Sequence[int] | None = None,
  rules: Rules | None = None,
  what: str = "",
) -> NamedSharding:
  spec = logical_to_spec(logical, rules)
  if shape is not None:
    spec = _fit_spec(spec, shape, mesh, what)
  return NamedSharding(mesh, spec)


def tree_shardings(
  mesh: Mesh, logical_tree: Any, shape_tree: Any, rules: Rules | None = None
) -> Any:
  """NamedShardings for a pytree, given a matching tree of logical-axis tuples and of shapes."""
  paths_shapes = jax.tree_util.tree_flatten_with_path(shape_tree)[0]
  logical_leaves = jax.tree_util.tree_leaves(logical_tree, is_leaf=lambda x: isinstance(x, tuple))
  if len(logical_leaves) != len(paths_shapes):
    raise ValueError("logical-axis tree and shape tree do not match")
  out = [
    named_sharding(mesh, lg, s.shape, rules, jax.tree_util.keystr(path))
    for lg, (path, s) in zip(logical_leaves, paths_shapes)
  ]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape_tree), out)


def constrain(x: jax.Array, logical: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
  """``with_sharding_constraint`` by logical names (the current table); a no-op outside a mesh
  context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(logical, rules)
  fixed = []
  for dim, axes in zip(x.shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    fixed.append(axes if not names or dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return jax.lax.with_sharding_constraint(x, P(*fixed))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, seq, ...] input batch."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + ("seq",) + (None,) * (ndim - 2)))


# --- the --mesh flag's text ---

DEFAULT_MESH = "1,-1,1"


def mesh_shape(text: str) -> tuple[int, int, int]:
  """``"data,fsdp,tensor"`` -> three ints (one may be -1); a bad value is a ``UserError``."""
  try:
    shape = tuple(int(x) for x in str(text).split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
    raise UserError(
      f"--mesh must be data,fsdp,tensor: three positive integers, one of them may be "
      f"-1 (e.g. {DEFAULT_MESH}); got {text!r}"
    )
  return shape  # type: ignore[return-value]


def mesh_from_text(text: str = DEFAULT_MESH) -> Mesh:
  """The device mesh a ``--mesh`` value names, over all of this job's devices."""
  try:
    return make_mesh(mesh_shape(text))
  except ValueError as e:
    raise UserError(f"--mesh={text}: {e}") from None
