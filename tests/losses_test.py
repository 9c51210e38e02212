"""Tests of faithful_rl.losses against values worked out by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faithful_rl import losses

LN2 = math.log(2.0)


def close(x, y, tol=1e-5):
  np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------
# Advantages.
# ------------------------------------------------------------------------------


def test_grpo_advantages_hand_values():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  # Group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735.
  a = losses.grpo_advantages(rewards=r, group_size=4)
  close(a[:4], [0.866025, -0.866025, -0.866025, 0.866025])
  assert np.all(np.asarray(a[4:]) == 0.0)  # all-equal group: exactly 0
  # Population std 0.5.
  a = losses.grpo_advantages(rewards=r, group_size=4, std_mode="population")
  close(a[:4], [1.0, -1.0, -1.0, 1.0])


def test_grpo_advantages_all_equal_is_exactly_zero():
  # 0.1 * 3 / 3 != 0.1 in floating point; the result must still be 0.
  r = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
  a = losses.grpo_advantages(rewards=r, group_size=3)
  assert np.all(np.asarray(a) == 0.0)
  a = losses.grpo_advantages(rewards=r, group_size=3, scale=False)
  assert np.all(np.asarray(a) == 0.0)


def test_grpo_advantages_group_ids_and_unscaled():
  r = jnp.array([1.0, 2.0, 3.0, 5.0, 4.0])
  ids = jnp.array([7, 3, 7, 3, 11])  # group 11 has one member
  a = jax.jit(
      lambda r, i: losses.grpo_advantages(rewards=r, group_ids=i, scale=False)
  )(r, ids)
  close(a, [-1.0, -1.5, 1.0, 1.5, 0.0])
  a = losses.grpo_advantages(rewards=r, group_ids=ids)
  # Group 7: (1, 3), sample std sqrt(2); group 3: (2, 5), std sqrt(4.5).
  close(a, [-1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2),
            1 / math.sqrt(2), 0.0])  # fmt: skip
  with pytest.raises(ValueError):
    losses.grpo_advantages(rewards=r)


# ------------------------------------------------------------------------------
# Clipped surrogate.
# ------------------------------------------------------------------------------

# (ratio, advantage, loss, d loss / d logp) for eps_low 0.2, eps_high 0.28.
CLIP_CASES = [
    (1.1, 2.0, -2.2, -2.2),  # inside
    (1.5, 2.0, -2.56, 0.0),  # A > 0 above 1 + eps_high: clipped
    (0.5, 2.0, -1.0, -1.0),  # A > 0 below 1 - eps_low: not clipped
    (0.5, -2.0, 1.6, 0.0),  # A < 0 below 1 - eps_low: clipped
    (1.5, -2.0, 3.0, 3.0),  # A < 0 above 1 + eps_high: not clipped
    (1.1, -2.0, 2.2, 2.2),  # inside
]


@pytest.mark.parametrize("ratio,adv,want_loss,want_grad", CLIP_CASES)
def test_clip_region(ratio, adv, want_loss, want_grad):
  def f(logp):
    return losses.policy_loss(
        logp=logp,
        old_logp=jnp.zeros((1, 1)),
        advantages=jnp.array([adv]),
        mask=jnp.ones((1, 1)),
        clip_low=0.2,
        clip_high=0.28,
    )[0]

  logp = jnp.full((1, 1), math.log(ratio))
  loss, grad = jax.value_and_grad(f)(logp)
  close(loss, want_loss)
  close(grad[0, 0], want_grad)
  if want_grad == 0.0:
    assert grad[0, 0] == 0.0


def test_clip_metrics_and_batch():
  ratios = jnp.array([[c[0]] for c in CLIP_CASES])
  adv = jnp.array([c[1] for c in CLIP_CASES])
  f = lambda lp: losses.dapo_loss(
      logp=lp, old_logp=jnp.zeros((6, 1)), advantages=adv, mask=jnp.ones((6, 1))
  )
  (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.log(ratios))
  close(loss, sum(c[2] for c in CLIP_CASES) / 6)
  close(grad[:, 0], [c[3] / 6 for c in CLIP_CASES])
  close(m["clip_frac_high"], 1 / 6)
  close(m["clip_frac_low"], 1 / 6)
  close(m["ratio_max"], 1.5)
  close(m["ratio_mean"], (1.1 + 1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 6)
  close(m["pg_loss"], loss)


def test_dual_clip_caps_negative_advantage_losses():
  # A = -2, eps 0.2 / 0.28, c = 3. Ratio 5: PPO's loss -min(5 * -2, 1.28 *
  # -2) = 10 > c |A| = 6, capped at 6 with no gradient. Ratio 2.5: 5 < 6,
  # untouched, gradient r |A| = 5. Positive A is never capped.
  def f(ratio, adv, c):
    return losses.policy_loss(
        logp=jnp.full((1, 1), jnp.log(ratio)),
        old_logp=jnp.zeros((1, 1)),
        advantages=jnp.array([adv]),
        mask=jnp.ones((1, 1)),
        clip_low=0.2,
        clip_high=0.28,
        clip_ratio_c=c,
    )

  grad = lambda ratio, adv, c: jax.grad(
      lambda lp: losses.policy_loss(
          logp=lp, old_logp=jnp.zeros((1, 1)), advantages=jnp.array([adv]),
          mask=jnp.ones((1, 1)), clip_ratio_c=c,
      )[0]
  )(jnp.full((1, 1), jnp.log(ratio)))[0, 0]  # fmt: skip
  loss, m = f(5.0, -2.0, 3.0)
  close(loss, 6.0)
  close(m["clip_frac_dual"], 1.0)
  assert float(grad(5.0, -2.0, 3.0)) == 0.0
  close(f(5.0, -2.0, 0.0)[0], 10.0)  # off
  close(grad(5.0, -2.0, 0.0), 10.0)
  close(f(2.5, -2.0, 3.0)[0], 5.0)
  close(grad(2.5, -2.0, 3.0), 5.0)
  close(f(5.0, 2.0, 3.0)[0], -2.56)  # A > 0: the usual clip only
  with pytest.raises(ValueError, match="clip_ratio_c"):
    f(1.0, 1.0, 0.5)


def test_normalizer_makes_micro_batch_losses_add_up():
  rng = np.random.default_rng(0)
  logp = jnp.asarray(rng.normal(size=(6, 5)) - 2.0, jnp.float32)
  old = jnp.asarray(rng.normal(size=(6, 5)) - 2.0, jnp.float32)
  adv = jnp.asarray(rng.normal(size=6), jnp.float32)
  mask = jnp.asarray(np.arange(5)[None] < np.array([5, 2, 0, 4, 1, 3])[:, None])
  for agg, norm in (
      ("token-mean", float(mask.sum())),
      ("seq-mean-token-mean", 5.0),  # one response has no token
      ("seq-mean-token-sum", 5.0),
  ):
    kw = dict(aggregation=agg, clip_low=0.2, clip_high=0.28)
    full, _ = losses.policy_loss(
        logp=logp, old_logp=old, advantages=adv, mask=mask, **kw
    )
    parts = sum(
        losses.policy_loss(
            logp=logp[s], old_logp=old[s], advantages=adv[s], mask=mask[s],
            normalizer=norm, **kw,
        )[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    )  # fmt: skip
    close(parts, full, tol=1e-6)


def test_registry_picks_losses_by_name():
  assert losses.get("policy", "dapo") is losses.dapo_loss
  assert losses.get("policy", "grpo") is losses.grpo_loss
  assert losses.get("attention", "ease") is losses.ease_loss
  with pytest.raises(KeyError, match="no policy loss named 'dpo'.*dapo"):
    losses.get("policy", "dpo")

  @losses.register("policy", "test_half_dapo")
  def half(**kw):
    loss, m = losses.dapo_loss(**kw)
    return 0.5 * loss, m

  kw = dict(
      logp=jnp.zeros((1, 2)),
      old_logp=jnp.zeros((1, 2)),
      advantages=jnp.ones(1),
      mask=jnp.ones((1, 2)),
  )
  close(losses.get("policy", "test_half_dapo")(**kw)[0], -0.5)
  with pytest.raises(ValueError, match="kind"):
    losses.register("value", "x", half)


def test_grpo_vs_dapo_clip_defaults():
  kw = dict(
      logp=jnp.full((1, 1), math.log(1.25)),
      old_logp=jnp.zeros((1, 1)),
      advantages=jnp.ones(1),
      mask=jnp.ones((1, 1)),
  )
  close(losses.dapo_loss(**kw)[0], -1.25)  # 1.25 < 1.28: not clipped
  close(losses.grpo_loss(kl_beta=0.0, **kw)[0], -1.2)  # clipped at 1.2
  with pytest.raises(ValueError):
    losses.grpo_loss(**kw)  # beta 0.04 needs a reference


def test_losses_jit():
  kw = dict(
      logp=jnp.full((2, 2), math.log(1.5)),
      old_logp=jnp.zeros((2, 2)),
      advantages=jnp.array([1.0, -1.0]),
      mask=jnp.array([[1, 1], [1, 0]]),
  )
  eager, _ = losses.dapo_loss(**kw)
  jitted, m = jax.jit(lambda kw: losses.dapo_loss(**kw))(kw)
  close(jitted, eager)
  close(eager, (-1.28 * 2 + 1.5) / 3)
  close(m["clip_frac_high"], 2 / 3)


def _ragged(aggregation, token_weights=None):
  # Ratio 1 everywhere, so each token's loss is -A. Row 2 is padding.
  adv = jnp.array([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [5.0, 5.0, 5.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  f = lambda lp: losses.policy_loss(
      logp=lp,
      old_logp=jnp.zeros((3, 3)),
      advantages=adv,
      mask=mask,
      aggregation=aggregation,
      token_weights=token_weights,
  )[0]
  return jax.value_and_grad(f)(jnp.zeros((3, 3)))


def test_aggregations_differ_on_ragged_batch():
  loss, grad = _ragged("token-mean")
  close(loss, -(1 + 2 + 3 + 10) / 4)
  close(grad, [[-0.25, -0.5, -0.75], [-2.5, 0, 0], [0, 0, 0]])
  loss, grad = _ragged("seq-mean-token-mean")
  close(loss, -(6 / 3 + 10) / 2)
  close(grad, [[-1 / 6, -2 / 6, -3 / 6], [-5, 0, 0], [0, 0, 0]])
  loss, _ = _ragged("seq-mean-token-sum")
  close(loss, -(6 + 10) / 2)


def test_token_weights_zero_gradient_same_denominator():
  w = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
  loss, grad = _ragged("token-mean", token_weights=w)
  close(loss, -(1 + 3 + 10) / 4)  # still divided by all 4 tokens
  assert grad[0, 1] == 0.0
  close(grad[0, 0], -0.25)


def test_k3_reference_kl():
  f = lambda lp: losses.policy_loss(
      logp=lp,
      old_logp=lp,
      advantages=jnp.zeros(1),
      mask=jnp.ones((1, 1)),
      ref_logp=jnp.full((1, 1), -LN2),
      kl_beta=0.04,
  )
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.zeros((1, 1)))
  k3 = 0.5 + LN2 - 1.0  # exp(-ln 2) + ln 2 - 1
  close(m["kl_ref"], k3)
  close(loss, 0.04 * k3)
  close(g[0, 0], 0.04 * (1.0 - 0.5))  # d/dlp: 1 - exp(lp_ref - lp)


def test_approx_kl_metric():
  _, m = losses.policy_loss(
      logp=jnp.full((1, 1), LN2),
      old_logp=jnp.zeros((1, 1)),
      advantages=jnp.zeros(1),
      mask=jnp.ones((1, 1)),
  )
  close(m["approx_kl"], 0.5 + LN2 - 1.0)  # k3 with old/new = 1/2


# ------------------------------------------------------------------------------
# Token log-probs, entropy, masked helpers.
# ------------------------------------------------------------------------------


def test_masked_helpers():
  x = jnp.array([[1.0, 2.0, jnp.nan], [4.0, 5.0, 6.0]])
  m = jnp.array([[1, 1, 0], [0, 0, 0]])
  close(losses.masked_sum(x, m), 3.0)
  close(losses.masked_mean(x, m, axis=-1), [1.5, 0.0])


def test_token_entropy_and_logprobs():
  logits = jnp.log(jnp.array([0.5, 0.25, 0.25]))
  close(losses.token_entropy(logits), 1.5 * LN2)
  close(losses.token_entropy(jnp.array([0.0, -jnp.inf, 0.0])), LN2)
  close(losses.token_entropy(jnp.array([1000.0, 0.0])), 0.0)
  close(
      losses.token_logprobs(jnp.array([[0.0, math.log(3.0)]]), jnp.array([1])),
      [math.log(0.75)],
  )
  lp = losses.token_logprobs(
      jnp.array([0.0, math.log(3.0)], jnp.bfloat16), jnp.array(0)
  )
  assert lp.dtype == jnp.float32


def _all_avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if hasattr(sub, "eqns"):  # Jaxpr
          yield from _all_avals(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # ClosedJaxpr
          yield from _all_avals(sub.jaxpr)


def test_chunked_token_logprobs_matches_and_stays_chunked():
  b, t, d, v, chunk = 2, 7, 5, 11, 3
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(k1, (b, t, d))
  head = jax.random.normal(k2, (d, v))
  targets = jax.random.randint(k3, (b, t), 0, v)

  def full(h, w):
    z = h @ w
    return losses.token_logprobs(z, targets), losses.token_entropy(z)

  def chunked(h, w):
    return losses.chunked_token_logprobs(h, w, targets, chunk)

  lp, ent = chunked(hidden, head)
  lp_ref, ent_ref = full(hidden, head)
  close(lp, lp_ref)
  close(ent, ent_ref)
  obj = lambda fn: lambda h, w: (lambda o: o[0].sum() + 0.3 * o[1].sum())(
      fn(h, w)
  )
  g = jax.grad(obj(chunked), argnums=(0, 1))(hidden, head)
  g_ref = jax.grad(obj(full), argnums=(0, 1))(hidden, head)
  close(g[0], g_ref[0])
  close(g[1], g_ref[1])
  # No array as large as the full [B, T, V] logits, forward or backward.
  jaxpr = jax.make_jaxpr(jax.grad(obj(chunked), argnums=(0, 1)))(hidden, head)
  biggest = max(
      math.prod(a.shape) for a in _all_avals(jaxpr.jaxpr) if hasattr(a, "shape")
  )
  assert biggest < b * t * v, biggest
  assert biggest >= b * chunk * v  # one chunk's logits do exist


# ------------------------------------------------------------------------------
# Overlong shaping, filtering, dynamic sampling.
# ------------------------------------------------------------------------------


def test_overlong_penalty_boundaries():
  # L_max = 20, L_cache = 4: soft limit 16.
  got = losses.overlong_penalty(
      lengths=jnp.array([0, 16, 17, 19, 20, 21]), max_len=20, cache_len=4
  )
  close(got, [0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
  got = losses.overlong_penalty(
      lengths=jnp.array([20, 21]), max_len=20, cache_len=0
  )
  close(got, [0.0, -1.0])


def test_overlong_filter_mask():
  keep = losses.overlong_filter_mask(truncated=jnp.array([True, False]))
  close(keep, [0.0, 1.0])
  m = losses.overlong_filter_mask(
      truncated=jnp.array([True, False]), mask=jnp.ones((2, 2))
  )
  close(m, [[0, 0], [1, 1]])


def test_dynamic_sampling_helpers():
  r = [1, 1, 0, 1, 0, 0]
  np.testing.assert_array_equal(
      losses.zero_variance_groups(r, 2), [True, False, True]
  )
  r = [1, 1, 0, 1, 1, 0, 0, 0, 0.5, 0.5, 0.2, 0.5]
  np.testing.assert_array_equal(losses.select_groups(r, 2, 1), [1])
  np.testing.assert_array_equal(losses.select_groups(r, 2, 9), [1, 2, 5])
  assert losses.select_groups(r, 2, 0).size == 0


# ------------------------------------------------------------------------------
# EASE.
# ------------------------------------------------------------------------------

# Two probed rows over 3 visual columns (column 2 is padding); each row puts
# 0.4 on the visual tokens, renormalised [.5, .5] and [.25, .75].
ATT = jnp.array([[[0.2, 0.2, 0.0], [0.1, 0.3, 0.0]]])
VALID = jnp.array([[True, True, False]])
TARGET = jnp.array([[0.5, 0.5, 0.0]])


def test_attention_kl_hand_values():
  kl = losses.attention_kl(attention=ATT, target=TARGET, valid=VALID)
  # a = [.375, .625].
  close(kl, [0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)])
  kl = losses.attention_kl(
      attention=ATT, target=TARGET, valid=VALID, direction="model_to_target"
  )
  close(kl, [0.375 * math.log(0.375 / 0.5) + 0.625 * math.log(0.625 / 0.5)])
  kl = losses.attention_kl(
      attention=ATT, target=TARGET, valid=VALID, renormalize=False
  )
  # a = [.15, .25] without renormalisation.
  close(kl, [0.5 * math.log(0.5 / 0.15) + 0.5 * math.log(0.5 / 0.25)])
  kl = losses.attention_kl(
      attention=ATT,
      target=TARGET,
      valid=VALID,
      query_mask=jnp.array([[True, False]]),
  )
  close(kl, [0.0])


def test_attention_kl_ignores_padding_and_averages_heads():
  noisy = ATT.at[:, :, 2].set(0.5)  # garbage in the padding column
  base = losses.attention_kl(attention=ATT, target=TARGET, valid=VALID)
  close(losses.attention_kl(attention=noisy, target=TARGET, valid=VALID), base)
  heads = jnp.stack([ATT * 0.5, ATT * 1.5], axis=1)  # [B, H, Q, V]
  close(losses.attention_kl(attention=heads, target=TARGET, valid=VALID), base)


@pytest.mark.parametrize("direction", ["target_to_model", "model_to_target"])
def test_attention_kl_gradient_moves_toward_target(direction):
  target = jnp.array([[0.5, 0.5, 0.0, 0.0]])
  valid = jnp.ones((1, 4), bool)
  z = jax.random.normal(jax.random.key(1), (1, 2, 4))

  def kl(z):
    a = jax.nn.softmax(z, axis=-1)
    return losses.attention_kl(
        attention=a, target=target, valid=valid, direction=direction
    )[0]

  def mass(z):
    return jax.nn.softmax(z, axis=-1)[..., :2].sum(-1).mean()

  z1 = z - 0.1 * jax.grad(kl)(z)
  assert kl(z1) < kl(z)
  assert mass(z1) > mass(z)


def test_attention_layers_average_like_heads():
  other = jnp.array([[[0.1, 0.1, 0.0], [0.3, 0.1, 0.0]]])
  kw = dict(target=TARGET, valid=VALID)
  both = losses.attention_kl(attention={3: ATT, 5: other}, **kw)
  close(both, losses.attention_kl(attention=(ATT + other) / 2, **kw))


def _ease_batch():
  att = jnp.array([
      [[0.2, 0.2, 0.0], [0.1, 0.3, 0.0]],
      [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # degenerate row: no NaN
      [[0.3, 0.1, 0.0], [0.2, 0.2, 0.0]],
      [[0.1, 0.1, 0.0], [0.3, 0.1, 0.0]],
  ])
  valid = jnp.tile(VALID, (4, 1))
  target = jnp.tile(TARGET, (4, 1)).at[2].set(jnp.array([0.8, 0.2, 0.0]))
  return att, valid, target


def test_ease_loss_gate():
  att, valid, target = _ease_batch()
  rewards = jnp.array([1.0, 0.0, 0.5, 0.49])
  per = losses.attention_kl(attention=att, target=target, valid=valid)
  evidence = jnp.tile(jnp.array([[True, False, False]]), (4, 1))

  def f(att, rewards, gate=True):
    return losses.ease_loss(
        attention=att,
        target=target,
        valid=valid,
        rewards=rewards,
        evidence_mask=evidence,
        gate=gate,
    )

  (loss, m), g = jax.value_and_grad(f, has_aux=True)(att, rewards)
  close(loss, (per[0] + per[2]) / 2)
  assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.asarray(g[3]) == 0.0)
  assert np.any(np.asarray(g[0]) != 0.0) and np.any(np.asarray(g[2]) != 0.0)
  close(m["gate_coverage"], 0.5)
  close(m["attn_kl"], loss)
  # Trajectory distributions: [.375, .625], [0, 0], [.625, .375] twice.
  close(m["evidence_mass"], (0.375 + 0.0 + 0.625 + 0.625) / 4)
  close(m["pointing_hit"], 2 / 4)  # an all-zero row is no hit

  # Gate off: every trajectory counts.
  loss_all, _ = f(att.at[1].set(ATT[0]), rewards, gate=False)
  close(loss_all, (per[0] + per[0] + per[2] + per[3]) / 4)

  # No trajectory passes: loss and gradient exactly zero, finite.
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(att, jnp.zeros(4))
  assert float(loss) == 0.0
  assert np.all(np.asarray(g) == 0.0)
  assert float(m["gate_coverage"]) == 0.0


def test_ease_loss_target_mask():
  att, valid, target = _ease_batch()
  per = losses.attention_kl(attention=att, target=target, valid=valid)
  loss, _ = losses.ease_loss(
      attention=att,
      target=target,
      valid=valid,
      rewards=jnp.ones(4),
      target_mask=jnp.array([False, False, True, True]),
  )
  close(loss, (per[2] + per[3]) / 2)
  # An all-zero target (no box) never counts.
  loss, m = losses.ease_loss(
      attention=att,
      target=target.at[0].set(0.0),
      valid=valid,
      rewards=jnp.array([1.0, 0.0, 1.0, 0.0]),
  )
  close(loss, per[2])
  close(m["gate_coverage"], 0.25)


def test_sample_query_rows():
  mask = jnp.array([[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]])
  pos, ok = losses.sample_query_rows(
      jax.random.key(0), mask, k=3, offset=jnp.array([10, 20])
  )
  assert pos.dtype == jnp.int32 and pos.shape == (2, 3)
  np.testing.assert_array_equal(ok, [[True] * 3, [True, True, False]])
  row0 = np.asarray(pos[0])
  assert len(set(row0)) == 3 and set(row0) <= set(range(10, 15))
  assert list(row0) == sorted(row0)
  np.testing.assert_array_equal(pos[1, :2], [22, 23])
  # K larger than T pads.
  pos, ok = losses.sample_query_rows(jax.random.key(0), mask, k=10)
  assert pos.shape == (2, 10)
  np.testing.assert_array_equal(ok.sum(-1), [5, 2])
  # Uniform: each of the 5 tokens of row 0 is picked with probability 3/5.
  keys = jax.random.split(jax.random.key(1), 2000)
  pos, _ = jax.vmap(lambda k: losses.sample_query_rows(k, mask, k=3))(keys)
  freq = np.array(
      [(np.asarray(pos[:, 0]) == j).any(-1).mean() for j in range(5)]
  )
  assert np.all(np.abs(freq - 0.6) < 0.05), freq


# ------------------------------------------------------------------------------
# Faithful-MR1.
# ------------------------------------------------------------------------------


def _anchor_inputs():
  att = jnp.array([
      [[0.1, 0.2, 0.2, 0.1], [0.4, 0.1, 0.1, 0.1], [0.0, 0.0, 0.1, 0.5]],
      [[0.3, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2]],
  ])
  target = jnp.array([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])  # no box
  return att, target, jnp.ones((2, 4), bool)


def test_anchor_loss_hand_value_and_reads_focus_row_only():
  att, target, valid = _anchor_inputs()
  f = lambda a: losses.anchor_loss(
      focus_attention=a, focus_target=target, valid=valid
  )
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(att)
  # Focus row [.1, .2, .2, .1] -> [1/6, 1/3, 1/3, 1/6]; KL = ln 1.5.
  close(loss, math.log(1.5))
  close(m["anchor_coverage"], 0.5)
  close(m["focus_mass"], 2 / 3)
  close(m["focus_hit"], 1.0)
  assert np.all(np.asarray(g[:, 1:]) == 0.0)  # other rows: no gradient
  assert np.all(np.asarray(g[1]) == 0.0)  # example without box
  perturbed = att.at[:, 1:].set(
      jax.random.uniform(jax.random.key(2), (2, 2, 4))
  )
  close(f(perturbed)[0], loss)
  assert abs(float(f(att.at[0, 0, 0].set(0.4))[0]) - float(loss)) > 1e-3
  # [B, V] input (row already picked) and [B, H, Q, V] input agree.
  close(f(att[:, 0])[0], loss)
  close(f(jnp.stack([att, att], 1))[0], loss)


def test_causal_effect():
  got = losses.causal_effect(
      logp_orig=jnp.array([-1.0, -1.0, -1.0]),
      logp_cf=jnp.array([-2.0, -1.0, -0.5]),
  )
  np.testing.assert_array_equal(got, [True, False, False])
  got = losses.causal_effect(
      logp_orig=jnp.array([-1.0, -1.0]),
      logp_cf=jnp.array([-2.0, -3.0]),
      margin=1.5,
  )
  np.testing.assert_array_equal(got, [False, True])
  got = losses.causal_effect(
      correct_orig=jnp.array([True, True, False, False]),
      correct_cf=jnp.array([False, True, False, True]),
      test="rollout_flip",
  )
  np.testing.assert_array_equal(got, [True, False, False, False])
  with pytest.raises(ValueError):
    losses.causal_effect(correct_orig=jnp.array([True]), test="rollout_flip")


def test_attention_mass_reward():
  att = jnp.tile(jnp.array([[0.2, 0.2, 0.1]]), (3, 1))  # -> [.4, .4, .2]
  got = losses.attention_mass_reward(
      attention=att,
      evidence_mask=jnp.tile(jnp.array([[True, False, False]]), (3, 1)),
      valid=jnp.ones((3, 3), bool),
      correct=jnp.array([True, True, False]),
      causal=jnp.array([True, False, True]),
      lambda_attn=0.1,
  )
  close(got, [0.04, 0.0, 0.0])


# ------------------------------------------------------------------------------
# VPPO.
# ------------------------------------------------------------------------------


def test_visual_dependency():
  lp_pert = jnp.array([[0.0, LN2, -LN2, 20.0, -20.0, 3.0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 0]])
  s = losses.visual_dependency(
      logp_perturbed=lp_pert, logp_orig=jnp.zeros((1, 6)), mask=mask
  )
  close(s, [[0.0, 1.0 - LN2, LN2 - 0.5, 10.0, 10.0, 0.0]])


def test_topk_token_mask_hand_example():
  scores = jnp.array([
      [5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
      [1.0, 1.0, 1.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0],
      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
      [9.0] * 10,
  ])
  mask = jnp.array([[1] * 5 + [0] * 5, [1] * 3 + [0] * 7, [1] * 10, [0] * 10])
  keep = losses.topk_token_mask(scores=scores, mask=mask, frac=0.4)
  want = np.zeros((4, 10), bool)
  want[0, [0, 2]] = True  # n = 5: k = 2, scores 5 and 4
  want[1, [0, 1]] = True  # n = 3: k = ceil(1.2) = 2, ties -> earliest
  want[2, 6:] = True  # n = 10: k = 4
  np.testing.assert_array_equal(keep, want)
  keep = losses.topk_token_mask(scores=scores, mask=mask, frac=0.7)
  np.testing.assert_array_equal(keep.sum(-1), [4, 3, 7, 0])  # ceil(3.5), 7
  scores = jax.random.uniform(jax.random.key(3), (1, 1000))
  for frac, k in ((0.4, 400), (0.7, 700), (0.33, 330), (0.001, 1)):
    keep = losses.topk_token_mask(
        scores=scores, mask=jnp.ones((1, 1000)), frac=frac
    )
    assert int(keep.sum()) == k
    assert float(scores[keep].min()) >= float(scores[~keep].max())


def test_vppo_advantage_scale_hand_example():
  got = losses.vppo_advantage_scale(seq_scores=jnp.array([1.0, 2.0, 3.0, 5.0]))
  # s = [0, .25, .5, 1], mean .4375, beta_max = .9 + .1 / .4375.
  bmax = 0.9 + 0.1 / 0.4375
  close(got, [0.9 + s * (bmax - 0.9) for s in (0.0, 0.25, 0.5, 1.0)])
  close(got.mean(), 1.0)
  close(losses.vppo_advantage_scale(seq_scores=jnp.full(3, 0.7)), [1.0] * 3)
  got = losses.vppo_advantage_scale(
      seq_scores=jnp.array([1.0, 2.0, 3.0, 100.0]),
      valid=jnp.array([True, True, True, False]),
  )
  close(got, [0.9, 1.0, 1.1, 1.0])
