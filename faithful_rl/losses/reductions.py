"""Masked reductions shared by every loss (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


# ------------------------------------------------------------------------------
# Masked reductions.
# ------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, *, axis=None) -> Array:
  """Sum of `x` where `mask` (bool or float weights), ignoring masked NaNs."""
  mask = jnp.asarray(mask)
  x = jnp.where(mask != 0, x, 0.0)
  return jnp.sum(x * mask.astype(jnp.float32), axis=axis)


def masked_mean(x: Array, mask: Array, *, axis=None, count=None) -> Array:
  """Mean of `x` over `mask`; 0 (not NaN) where the mask is empty.

  `count` replaces the mask's own count as the denominator (at least 1):
  a micro-batch divides by its minibatch's count, so that the micro-batch
  means add up to the minibatch's mean.
  """
  total = masked_sum(x, mask, axis=axis)
  if count is not None:
    return total / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
  count = jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=axis)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
