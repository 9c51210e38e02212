"""VPPO: visual dependency, top-k token filter, advantage scale (docs/methods.md 5)."""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp

from faithful_rl.losses.policy import _k3  # the k3 KL estimator
from faithful_rl.losses.reductions import masked_mean

Array = jax.Array


# ------------------------------------------------------------------------------
# VPPO (docs/methods.md 5).
# ------------------------------------------------------------------------------


def visual_dependency(
    *, logp_perturbed: Array, logp_orig: Array, mask: Array
) -> Array:
  """VPPO token visual dependency, float32[B, T] (no gradient).

  S = exp(d) - d - 1 with d = lp_perturbed - lp_orig, clamped to [0, 10];
  0 off the mask.
  """
  d = jnp.asarray(logp_perturbed, jnp.float32) - jnp.asarray(logp_orig)
  s = jnp.clip(_k3(d), 0.0, 10.0)
  return jax.lax.stop_gradient(jnp.where(jnp.asarray(mask) != 0, s, 0.0))


def topk_token_mask(*, scores: Array, mask: Array, frac: float = 0.4) -> Array:
  """bool[B, T]: the top `frac` of each response's valid tokens by score.

  Each response with n valid tokens keeps exactly k = ceil(frac * n)
  tokens (ceil, so any non-empty response keeps at least one). To keep
  float error (0.7 * 10 = 7.000000000000001) from adding one, `frac` is
  read as the nearest fraction p / q with q <= 1000 and k computed in
  integers. Ties go to the earlier position.
  """
  ratio = fractions.Fraction(frac).limit_denominator(1000)
  p, q = ratio.numerator, ratio.denominator
  m = jnp.asarray(mask).astype(bool)
  n = m.sum(-1).astype(jnp.int32)
  k = (n * p + q - 1) // q
  s = jnp.where(m, jnp.asarray(scores, jnp.float32), -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return m & (rank < k[:, None])


def vppo_advantage_scale(
    *, seq_scores: Array, beta_min: float = 0.9, valid: Array | None = None
) -> Array:
  """VPPO trajectory advantage multiplier float32[B] (no gradient).

  s = min-max normalised `seq_scores` over the (valid) batch,
  beta_max = beta_min + (1 - beta_min) / mean(s), multiplier
  beta_min + s (beta_max - beta_min) (its batch mean is exactly 1). When
  all valid scores are equal, s is undefined (mean(s) = 0) and the
  multiplier is 1 everywhere; invalid rows get 1.

  Args:
    seq_scores: float[B], e.g. per-response mean visual dependency
      (`masked_mean(S, mask, axis=-1)`).
    beta_min: lower end of the multiplier.
    valid: bool[B] rows that count (all when None).
  """
  x = jnp.asarray(seq_scores, jnp.float32)
  v = jnp.ones(x.shape, bool) if valid is None else jnp.asarray(valid) != 0
  lo = jnp.min(jnp.where(v, x, jnp.inf))
  hi = jnp.max(jnp.where(v, x, -jnp.inf))
  spread = hi - lo
  degenerate = ~(spread > 0)
  s = jnp.where(degenerate, 0.0, (x - lo) / jnp.where(degenerate, 1.0, spread))
  mean_s = masked_mean(s, v)
  beta_max = beta_min + (1.0 - beta_min) / jnp.where(mean_s > 0, mean_s, 1.0)
  out = beta_min + s * (beta_max - beta_min)
  out = jnp.where(degenerate | ~v, 1.0, out)
  return jax.lax.stop_gradient(out)
