"""The optimizer: AdamW, warm-up, clipping, and per-group learning rates.

Parameter groups are regexes over parameter paths (`visual/blocks/0/...`,
`language_model/...`, `lm_head/kernel`), first match wins; a group's
`lr_mult` scales the learning rate, and `lr_mult=0` freezes the group (its
update is exactly zero and it keeps no Adam moments). Weight decay skips
1-D parameters (norm scales and biases).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import optax

from faithful_rl.sharding import path_str


def schedule(
    *, lr: float, warmup_steps: int, total_steps: int, decay: str = "constant"
) -> optax.Schedule:
  """Linear warm-up from 0, then constant or cosine decay to 0."""
  warm = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if decay == "constant":
    after = optax.constant_schedule(lr)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest)
  else:
    raise ValueError(f"unknown lr decay {decay!r}")
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([warm, after], [warmup_steps])


def group_labels(params, groups: Sequence[tuple[str, float]]):
  """Pytree of group names ("g0", "g1", ..., "rest") matching `params`."""

  def label(path, _):
    name = path_str(path)
    for i, (pattern, _) in enumerate(groups):
      if re.search(pattern, name):
        return f"g{i}"
    return "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def make(
    params,
    *,
    lr: float,
    warmup_steps: int = 0,
    total_steps: int = 1,
    decay: str = "constant",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float = 0.0,
    groups: Sequence[tuple[str, float]] = (),
) -> optax.GradientTransformation:
  """AdamW over `params` (a pytree) with the options above.

  Args:
    params: the parameters (only their structure and paths are read).
    lr, warmup_steps, total_steps, decay: the learning-rate schedule.
    weight_decay: decoupled, on parameters with ndim >= 2.
    b1, b2, eps: Adam.
    grad_clip: global-norm clip before the update (0: off).
    groups: (path regex, lr multiplier); multiplier 0 freezes.
  """

  def adamw(mult: float):
    sched = schedule(
        lr=lr * mult,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=decay,
    )
    mask = jax.tree.map(lambda p: len(p.shape) >= 2, params)
    return optax.adamw(
        sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
    )

  transforms: dict[str, Any] = {"rest": adamw(1.0)}
  for i, (_, mult) in enumerate(groups):
    transforms[f"g{i}"] = optax.set_to_zero() if mult == 0 else adamw(mult)
  labels = group_labels(params, groups)
  tx = optax.multi_transform(transforms, labels)
  if grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


def frozen_patterns(cfg) -> tuple[str, ...]:
  """Path regexes of the groups an optim block freezes (multiplier 0)."""
  return tuple(str(p) for p, m in cfg.get("groups", ()) if float(m) == 0)


def from_config(params, cfg, total_steps: int) -> optax.GradientTransformation:
  """`make` from an ml_collections block (see configs/common.py)."""
  return make(
      params,
      lr=cfg.lr,
      warmup_steps=cfg.get("warmup_steps", 0),
      total_steps=total_steps,
      decay=cfg.get("decay", "constant"),
      weight_decay=cfg.get("weight_decay", 0.0),
      b1=cfg.get("b1", 0.9),
      b2=cfg.get("b2", 0.999),
      eps=cfg.get("eps", 1e-8),
      grad_clip=cfg.get("grad_clip", 0.0),
      groups=tuple((str(p), float(m)) for p, m in cfg.get("groups", ())),
  )
