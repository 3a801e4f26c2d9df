"""AdamW with global-norm clipping (``config.optimizer``), linear warmup and cosine decay
(``config.schedule``).

The reference recipe (AstroLLaMA, trained with the Hugging Face Trainer) is AdamW with a peak
``learning_rate``, ``warmup_ratio`` of the total steps of linear warmup and cosine decay to
``end_lr_ratio * learning_rate`` (``kind='constant'`` holds the peak after warmup);
gradients are clipped to ``grad_clip_norm``. Moments can be kept in bfloat16
(``moments_dtype``) to save two bytes per parameter each; the update itself is computed in
float32 either way and the master weights stay float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_schedule(schedule: Any, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the number of updates already applied (0-based).

  Update ``n`` (0-based) uses the schedule at ``n + 1``, so the very first update already has a
  non-zero rate (``lr / warmup_steps``), the warmup reaches ``lr`` at update ``warmup_steps``,
  and the last update, number ``total_steps``, lands on the floor ``end_lr_ratio * lr``.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  s = schedule
  if not 0.0 <= s.warmup_ratio < 1.0:
    raise ValueError(f"schedule.warmup_ratio must be in [0, 1), got {s.warmup_ratio}")
  lr, warmup = s.learning_rate, math.ceil(s.warmup_ratio * total_steps)
  if s.kind == "cosine" and warmup == 0:
    base = optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=s.end_lr_ratio)
  elif s.kind == "cosine":
    base = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=lr * s.end_lr_ratio,
    )
  elif s.kind == "constant":
    base = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )
  else:
    raise ValueError(f"schedule.kind {s.kind!r} is not 'cosine' or 'constant'")
  return lambda count: base(count + 1)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: not on RMSNorm scales (stacked norms are 2-D, so by name)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: not any("norm" in str(getattr(k, "key", "")) for k in path), params
  )


def keep_state_in(inner: optax.GradientTransformation, dtype: Any) -> optax.GradientTransformation:
  """Store ``inner``'s floating-point state in ``dtype`` while updating it in float32."""
  dtype = jnp.dtype(dtype)

  def cast(tree, to):
    return jax.tree.map(
      lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )

  def init(params):
    return cast(inner.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)


def make_optimizer(
  config: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, schedule) for ``config.optimizer`` and ``config.schedule`` over
  ``total_steps``."""
  o = config.optimizer
  schedule = make_schedule(config.schedule, total_steps)
  adamw = optax.adamw(
    schedule,
    b1=o.adam_b1,
    b2=o.adam_b2,
    eps=o.adam_eps,
    weight_decay=o.weight_decay,
    mask=_decay_mask,
  )
  if o.moments_dtype != "float32":
    adamw = keep_state_in(adamw, o.moments_dtype)
  chain = [adamw]
  if o.grad_clip_norm and o.grad_clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
  return optax.chain(*chain), schedule
