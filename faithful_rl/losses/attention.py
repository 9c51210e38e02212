"""Attention supervision: EASE and Faithful-MR1 (docs/methods.md 3-4).

Attention inputs are the model's probe outputs: float32[B, Q, V] (head
mean) or [B, H, Q, V] (per head), softmax probabilities over every key the
query sees, not renormalised over the visual columns; padding columns are
exactly 0. Axis alphabet: B responses, T response tokens, V visual tokens,
H heads, Q probed query rows, K sampled rows.

The EASE target (Gaussian mixture over the merged visual-token grid) is
built on the host by `faithful_rl.data.targets.ease_target`; the losses
here take it as an input array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from faithful_rl.losses.reductions import masked_mean

Array = jax.Array
Metrics = dict[str, Array]
_DIRECTIONS = ("target_to_model", "model_to_target")


# ------------------------------------------------------------------------------
# EASE: evidence-anchored attention (docs/methods.md 3).
# ------------------------------------------------------------------------------


def _head_mean(attention) -> Array:
  """[B, V] / [B, Q, V] / [B, H, Q, V] -> float32[B, Q, V].

  A dict {layer: array} or a list of arrays (several probed layers) is
  averaged over layers, as heads are.
  """
  if isinstance(attention, dict):
    attention = list(attention.values())
  if isinstance(attention, (list, tuple)):
    return sum(_head_mean(x) for x in attention) / len(attention)
  a = jnp.asarray(attention, jnp.float32)
  if a.ndim == 2:
    return a[:, None, :]
  if a.ndim == 4:
    return a.mean(axis=1)
  if a.ndim != 3:
    raise ValueError(
        f"attention must be [B,V], [B,Q,V] or [B,H,Q,V]: {a.shape}"
    )
  return a


def trajectory_attention(
    *,
    attention: Array,
    valid: Array,
    query_mask: Array | None = None,
    renormalize: bool = True,
    eps: float = 1e-8,
) -> Array:
  """Per-trajectory visual attention distribution a, float32[B, V].

  Each real query row is (optionally) renormalised over the valid visual
  columns, then the rows are averaged. Rows are renormalised before the
  mean so every sampled token weighs the same whatever its total visual
  attention.

  Args:
    attention: [B, V], [B, Q, V] or [B, H, Q, V] (heads are averaged), or
      {layer: such an array} (layers are averaged too).
    valid: [B, V] visual columns that exist.
    query_mask: [B, Q] real probed rows (all rows when None).
    renormalize: divide each row by its mass on the valid columns.
    eps: guards the row sums.
  """
  a = _head_mean(attention)
  v = jnp.asarray(valid).astype(jnp.float32)[:, None, :]
  a = a * v
  if renormalize:
    a = a / (a.sum(-1, keepdims=True) + eps)
  if query_mask is None:
    return a.mean(axis=1)
  qm = jnp.asarray(query_mask).astype(jnp.float32)
  return jnp.einsum("bqv,bq->bv", a, qm) / jnp.maximum(
      qm.sum(-1, keepdims=True), 1.0
  )


def _kl(p: Array, q: Array, valid: Array, eps: float) -> Array:
  """sum_v valid * p log(p / q), with 0 log 0 = 0; float32[B]."""
  pos = (p > 0) & valid
  p_safe = jnp.where(pos, p, 1.0)
  terms = p * (jnp.log(p_safe) - jnp.log(q + eps))
  return jnp.sum(jnp.where(pos, terms, 0.0), axis=-1)


def _normalize_target(target: Array, valid: Array) -> Array:
  t = jnp.asarray(target, jnp.float32) * valid
  total = t.sum(-1, keepdims=True)
  return t / jnp.where(total > 0, total, 1.0)


def attention_kl(
    *,
    attention: Array,
    target: Array,
    valid: Array,
    query_mask: Array | None = None,
    renormalize: bool = True,
    direction: str = "target_to_model",
    eps: float = 1e-8,
) -> Array:
  """Per-trajectory KL between the target and the attention, float32[B].

  'target_to_model' is KL(t || a) (the default, docs/methods.md 3), mass-covering:
  it pushes attention onto every part of the evidence. 'model_to_target'
  is KL(a || t), mode-seeking. The target is renormalised over the valid
  columns (a no-op for a proper target). Without `renormalize`, `a` sums to
  the visual share of attention (< 1) and KL(a || t) can be negative.

  Args:
    attention: [B, V], [B, Q, V] or [B, H, Q, V] probed attention.
    target: float[B, V] target distribution t.
    valid: [B, V] visual columns that exist.
    query_mask: [B, Q] real probed rows.
    renormalize, eps: see `trajectory_attention`.
    direction: 'target_to_model' | 'model_to_target'.
  """
  if direction not in _DIRECTIONS:
    raise ValueError(f"direction must be one of {_DIRECTIONS}.")
  valid = jnp.asarray(valid).astype(bool)
  a = trajectory_attention(
      attention=attention,
      valid=valid,
      query_mask=query_mask,
      renormalize=renormalize,
      eps=eps,
  )
  t = _normalize_target(target, valid)
  if direction == "target_to_model":
    return _kl(t, a, valid, eps)
  return _kl(a, t, valid, eps)


def attention_diagnostics(a: Array, evidence: Array, valid: Array):
  """Evidence mass float32[B] and pointing-game hit bool[B] of a[B, V].

  Mass: share of the (valid) visual attention inside the evidence tokens.
  Hit: the most-attended valid visual token is an evidence token.
  """
  ev = jnp.asarray(evidence).astype(bool) & valid
  a = jnp.where(valid, a, 0.0)
  mass = jnp.sum(jnp.where(ev, a, 0.0), -1) / jnp.maximum(a.sum(-1), 1e-12)
  top = jnp.argmax(jnp.where(valid, a, -jnp.inf), axis=-1)
  hit = jnp.take_along_axis(ev, top[:, None], -1)[:, 0]
  return mass, hit & (a.max(-1) > 0)  # an all-zero row points nowhere


def ease_loss(
    *,
    attention: Array,
    target: Array,
    valid: Array,
    rewards: Array,
    query_mask: Array | None = None,
    target_mask: Array | None = None,
    evidence_mask: Array | None = None,
    tau: float = 0.5,
    gate: bool = True,
    renormalize: bool = True,
    direction: str = "target_to_model",
    eps: float = 1e-8,
    normalizer: Array | float | None = None,
) -> tuple[Array, Metrics]:
  """EASE attention loss: KL averaged over reward-gated trajectories.

  A trajectory counts when reward >= tau (or always with `gate=False`) and
  it has a target (`target_mask`). Uncounted trajectories contribute exactly
  zero loss and exactly zero gradient: their attention is swapped for a
  constant before the KL. With no counted trajectory the loss is 0.

  Args:
    attention: [B, Q, V], [B, H, Q, V] or [B, V] probed attention.
    target: float[B, V] EASE target (`data.targets.ease_target`).
    valid: [B, V] visual columns that exist.
    rewards: float[B] trajectory rewards (the correctness reward when the
      total carries shaping terms).
    query_mask: [B, Q] real probed rows.
    target_mask: bool[B] trajectories to supervise (the no-box 'skip'
      switch passes False for examples without boxes); trajectories whose
      target is all zero on the valid columns never count.
    evidence_mask: bool[B, V] tokens covered by evidence boxes, for the
      diagnostics only (skipped when None).
    tau: reward gate.
    gate: apply the gate.
    renormalize, direction, eps: see `attention_kl`.
    normalizer: the number of counted trajectories to average over
      (default: this batch's, `ease_counted(...).sum()`); the whole
      minibatch's count makes micro-batch losses sum to its loss.

  Returns:
    (loss, metrics): gate_coverage (share of trajectories counted),
    attn_kl (mean KL over counted), attn_kl_all (mean over all with a
    target), and with `evidence_mask`, evidence_mass (share of visual
    attention inside the evidence) and pointing_hit (argmax visual token
    inside the evidence), both averaged over trajectories with evidence.
  """
  valid = jnp.asarray(valid).astype(bool)
  counted = ease_counted(
      target=target,
      valid=valid,
      rewards=rewards,
      target_mask=target_mask,
      tau=tau,
      gate=gate,
  )
  has_t = ease_counted(target=target, valid=valid, target_mask=target_mask)
  att = _head_mean(attention)
  safe = jnp.broadcast_to(valid[:, None, :].astype(jnp.float32), att.shape)
  att_in = jnp.where(counted[:, None, None], att, safe)
  kw = dict(valid=valid, query_mask=query_mask, renormalize=renormalize)
  kl = attention_kl(
      attention=att_in, target=target, direction=direction, eps=eps, **kw
  )
  loss = masked_mean(kl, counted, count=normalizer)

  sg = jax.lax.stop_gradient
  kl_all = attention_kl(
      attention=sg(att), target=target, direction=direction, eps=eps, **kw
  )
  metrics = {
      "gate_coverage": jnp.mean(counted.astype(jnp.float32)),
      "attn_kl": sg(loss),
      "attn_kl_all": masked_mean(kl_all, has_t),
  }
  if evidence_mask is not None:
    a = trajectory_attention(attention=sg(att), eps=eps, **kw)
    mass, hit = attention_diagnostics(a, evidence_mask, valid)
    has_ev = jnp.any(jnp.asarray(evidence_mask).astype(bool) & valid, -1)
    metrics["evidence_mass"] = masked_mean(mass, has_ev)
    metrics["pointing_hit"] = masked_mean(hit, has_ev)
  return loss, metrics


def ease_counted(
    *,
    target: Array,
    valid: Array,
    rewards: Array | None = None,
    target_mask: Array | None = None,
    tau: float = 0.5,
    gate: bool = False,
) -> Array:
  """bool[B]: the trajectories `ease_loss` supervises.

  Those with a target (mass on valid columns, and `target_mask`), and with
  `gate`, reward >= tau.
  """
  valid = jnp.asarray(valid).astype(bool)
  counted = jnp.any((jnp.asarray(target) > 0) & valid, axis=-1)
  if target_mask is not None:
    counted = counted & jnp.asarray(target_mask).astype(bool)
  if gate:
    counted = counted & (jnp.asarray(rewards, jnp.float32) >= tau)
  return counted


def sample_query_rows(
    rng: Array, response_mask: Array, k: int = 64, offset: Array | int = 0
) -> tuple[Array, Array]:
  """Up to K response tokens per trajectory, uniformly without replacement.

  Args:
    rng: a PRNG key, or one key per trajectory (key[B]): then each row's
      draw depends on its own key only, so a row samples the same query
      rows in any batch or micro-batch.
    response_mask: [B, T] valid response tokens.
    k: K rows per trajectory (static).
    offset: int or int[B] added to the column index, e.g. the position of
      the first response token in the full sequence (0 when the mask is
      already over the full sequence).

  Returns:
    positions int32[B, K] (increasing among the valid ones; padding slots
    hold `offset`), valid bool[B, K] (False where a response has < K
    tokens).
  """
  m = jnp.asarray(response_mask).astype(bool)
  b, t = m.shape
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:
    u = jax.vmap(lambda key: jax.random.uniform(key, (t,)))(rng)
  else:
    u = jax.random.uniform(rng, (b, t))
  keys = jnp.where(m, u, -1.0)
  kk = min(k, t)
  top, idx = jax.lax.top_k(keys, kk)
  ok = top >= 0
  # Sort the chosen positions, padding slots last.
  idx = jnp.sort(jnp.where(ok, idx, t), axis=-1)
  ok = idx < t
  idx = jnp.where(ok, idx, 0)
  if kk < k:
    idx = jnp.pad(idx, ((0, 0), (0, k - kk)))
    ok = jnp.pad(ok, ((0, 0), (0, k - kk)))
  off = jnp.asarray(offset, jnp.int32).reshape(-1, 1)
  return (idx + off).astype(jnp.int32), ok


# ------------------------------------------------------------------------------
# Faithful-MR1: anchoring and reinforcing (docs/methods.md 4).
# ------------------------------------------------------------------------------


def anchor_loss(
    *,
    focus_attention: Array,
    focus_target: Array,
    valid: Array,
    focus_row: int = 0,
    example_mask: Array | None = None,
    renormalize: bool = True,
    direction: str = "target_to_model",
    eps: float = 1e-8,
    normalizer: Array | float | None = None,
) -> tuple[Array, Metrics]:
  """Faithful-MR1 anchoring loss (docs/methods.md 4).

  KL between the <Focus> row's visual attention and the focus target,
  averaged over examples with boxes.

  Args:
    focus_attention: [B, V] (the <Focus> row), or [B, Q, V] / [B, H, Q, V]
      probed rows of which row `focus_row` is the <Focus> token (row 0
      when <Focus> is the first probed response token); other rows are
      not read. A {layer: array} dict averages the supervised layers.
    focus_target: float[B, V], e.g. uniform over the covered tokens, all
      zero for an example without boxes.
    valid: [B, V] visual columns that exist.
    focus_row: which probed row is <Focus> (for 3-D / 4-D inputs).
    example_mask: bool[B] examples to supervise; by default those whose
      target has mass on valid columns.
    renormalize, direction, eps: see `attention_kl`.
    normalizer: the number of supervised examples to average over
      (default: this batch's); see `ease_loss`.

  Returns:
    (loss, metrics): anchor_kl, anchor_coverage (share supervised),
    focus_mass (attention share on the target's support) and focus_hit
    (argmax on the support), over supervised examples.
  """
  rows = _head_mean(focus_attention)
  a = rows[:, focus_row if rows.shape[1] > 1 else 0]
  valid = jnp.asarray(valid).astype(bool)
  t = jnp.asarray(focus_target, jnp.float32)
  support = (t > 0) & valid
  has_t = jnp.any(support, -1)
  if example_mask is not None:
    has_t = has_t & jnp.asarray(example_mask).astype(bool)
  safe = valid.astype(jnp.float32)
  a_in = jnp.where(has_t[:, None], a, safe)
  kl = attention_kl(
      attention=a_in,
      target=t,
      valid=valid,
      renormalize=renormalize,
      direction=direction,
      eps=eps,
  )
  loss = masked_mean(kl, has_t, count=normalizer)
  sg = jax.lax.stop_gradient
  dist = trajectory_attention(
      attention=sg(a), valid=valid, renormalize=renormalize, eps=eps
  )
  mass, hit = attention_diagnostics(dist, support, valid)
  metrics = {
      "anchor_kl": sg(loss),
      "anchor_coverage": jnp.mean(has_t.astype(jnp.float32)),
      "focus_mass": masked_mean(mass, has_t),
      "focus_hit": masked_mean(hit, has_t),
  }
  return loss, metrics


def causal_effect(
    *,
    logp_orig: Array | None = None,
    logp_cf: Array | None = None,
    correct_orig: Array | None = None,
    correct_cf: Array | None = None,
    test: str = "logprob_drop",
    margin: float = 0.0,
) -> Array:
  """bool[B]: does masking the evidence change the outcome?

  'logprob_drop': the answer's log-prob (summed over answer tokens, teacher-
  forced on the counterfactual image) drops by more than `margin`:
  logp_orig - logp_cf > margin. 'rollout_flip': the original rollout is
  correct and the counterfactual rollout is wrong.
  """
  if test == "logprob_drop":
    if logp_orig is None or logp_cf is None:
      raise ValueError("logprob_drop needs logp_orig and logp_cf.")
    drop = jnp.asarray(logp_orig, jnp.float32) - jnp.asarray(logp_cf)
    return drop > margin
  if test == "rollout_flip":
    if correct_orig is None or correct_cf is None:
      raise ValueError("rollout_flip needs correct_orig and correct_cf.")
    return jnp.asarray(correct_orig).astype(bool) & ~jnp.asarray(
        correct_cf
    ).astype(bool)
  raise ValueError(f"test must be logprob_drop|rollout_flip, got {test!r}")


def attention_mass_reward(
    *,
    attention: Array,
    evidence_mask: Array,
    valid: Array,
    correct: Array,
    causal: Array,
    lambda_attn: float = 0.1,
    query_mask: Array | None = None,
    renormalize: bool = True,
) -> Array:
  """Faithful-MR1 reward bonus float32[B] (no gradient).

  lambda_attn * (share of the response's visual attention on the evidence
  tokens), paid only where the answer is correct and vision causally
  matters; 0 elsewhere.

  Args:
    attention: [B, V], [B, Q, V] or [B, H, Q, V] attention of the response
      tokens on the original image.
    evidence_mask: bool[B, V] tokens covered by the (masked) evidence.
    valid: [B, V] visual columns that exist.
    correct, causal: bool[B].
    lambda_attn: bonus weight.
    query_mask: [B, Q] real probed rows.
    renormalize: see `trajectory_attention`.
  """
  valid = jnp.asarray(valid).astype(bool)
  a = trajectory_attention(
      attention=jax.lax.stop_gradient(jnp.asarray(attention, jnp.float32)),
      valid=valid,
      query_mask=query_mask,
      renormalize=renormalize,
  )
  ev = jnp.asarray(evidence_mask).astype(bool) & valid
  mass = jnp.sum(jnp.where(ev, a, 0.0), -1)
  paid = jnp.asarray(correct).astype(bool) & jnp.asarray(causal).astype(bool)
  return jnp.where(paid, lambda_attn * mass, 0.0)
