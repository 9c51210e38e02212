"""Optimizer: schedules, freezing and per-group learning rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from faithful_rl import optim


def _params():
  return {
      "visual": {"proj": {"kernel": jnp.ones((3, 2))}},
      "language_model": {
          "q": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
      },
  }


def test_schedule_warmup_then_constant_or_cosine():
  s = optim.schedule(lr=1.0, warmup_steps=4, total_steps=12)
  np.testing.assert_allclose([s(0), s(2), s(4), s(11)], [0, 0.5, 1, 1])
  c = optim.schedule(lr=1.0, warmup_steps=4, total_steps=12, decay="cosine")
  np.testing.assert_allclose([c(4), c(8), c(12)], [1.0, 0.5, 0.0], atol=1e-6)


def test_frozen_group_never_moves_and_keeps_no_moments():
  params = _params()
  tx = optim.make(params, lr=0.1, groups=((r"^visual/", 0.0),))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["visual"]["proj"]["kernel"], 1.0)
  assert float(params["language_model"]["q"]["kernel"][0, 0]) < 1.0
  moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim >= 1)
  assert moments == 2 * (4 + 2)  # Adam's mu and nu of the language model


def test_group_learning_rate_multiplier():
  params = _params()
  tx = optim.make(params, lr=0.1, groups=((r"^visual/", 0.5),))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step moves every coordinate by lr * mult (sign of the grad).
  np.testing.assert_allclose(
      updates["visual"]["proj"]["kernel"], -0.05, rtol=1e-5
  )
  np.testing.assert_allclose(
      updates["language_model"]["q"]["kernel"], -0.1, rtol=1e-5
  )


def test_weight_decay_skips_vectors_and_clipping_bounds_the_step():
  params = _params()
  tx = optim.make(params, lr=1.0, weight_decay=0.5, grad_clip=1e-3)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradient: only decoupled decay moves matrices; biases stay.
  np.testing.assert_allclose(updates["language_model"]["q"]["kernel"], -0.5)
  np.testing.assert_array_equal(updates["language_model"]["q"]["bias"], 0.0)
