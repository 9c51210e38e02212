"""Losses chosen by name: `--config.rl.loss=dapo`, `--config.rl.ease.loss=ease`.

Two kinds, each a dict from name to a keyword-only function returning
`(loss, metrics)`:

  "policy"     (`rl.loss`): fn(*, logp, old_logp, advantages, mask,
               ref_logp, token_weights, normalizer, clip_low, clip_high,
               clip_ratio_c, aggregation, kl_beta). Arrays as
               `policy.policy_loss` takes them; `normalizer` is the
               minibatch's denominator (tokens for token-mean, responses
               otherwise), so that micro-batch losses add up exactly.
  "attention"  (`rl.ease.loss`): fn(*, attention, target, valid, rewards,
               query_mask, target_mask, evidence_mask, tau, gate,
               renormalize, direction, normalizer), as
               `attention.ease_loss` takes them; `normalizer` is the
               minibatch's number of supervised trajectories.

A new loss is one file that registers itself, imported before training:

  from faithful_rl import losses

  @losses.register("policy", "clip_only")
  def clip_only(*, logp, old_logp, advantages, mask, normalizer, **hp):
    ...
    return loss, {"my_metric": ...}

  # --config.rl.loss=clip_only

A loss may take `**kwargs` and ignore the hyperparameters it has no use
for. Metrics are float32 scalars; the trainer logs them as they are named.
"""

from __future__ import annotations

from typing import Callable

from faithful_rl.losses import attention
from faithful_rl.losses import policy

KINDS = ("policy", "attention")
_REGISTRY: dict[str, dict[str, Callable]] = {k: {} for k in KINDS}


def register(kind: str, name: str, fn: Callable | None = None):
  """Registers `fn` under `name` (as a decorator when `fn` is None).

  Registering a name again replaces the earlier function (a notebook may
  re-run its cell).
  """
  if kind not in _REGISTRY:
    raise ValueError(f"loss kind must be one of {KINDS}, not {kind!r}")

  def add(f: Callable) -> Callable:
    _REGISTRY[kind][name] = f
    return f

  return add if fn is None else add(fn)


def get(kind: str, name: str) -> Callable:
  """The loss registered under `name`; a KeyError lists the known names."""
  if kind not in _REGISTRY:
    raise ValueError(f"loss kind must be one of {KINDS}, not {kind!r}")
  try:
    return _REGISTRY[kind][name]
  except KeyError:
    raise KeyError(
        f"no {kind} loss named {name!r}; registered: {names(kind)}. Register"
        " one with faithful_rl.losses.register(...) before training."
    ) from None


def names(kind: str) -> list[str]:
  return sorted(_REGISTRY[kind])


register("policy", "grpo", policy.grpo_loss)
register("policy", "dapo", policy.dapo_loss)
register("policy", "ppo", policy.policy_loss)
register("attention", "ease", attention.ease_loss)
