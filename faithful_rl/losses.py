"""Pure policy-gradient and attention-supervision losses (METHODS.md 1-5).

Every loss is a keyword-only pure function returning `(loss, metrics)`,
with `loss` a float32 scalar and `metrics` a dict of float32 scalars that
carry no gradient. Log-softmax and all reductions run in float32.

Axis alphabet: B responses (trajectories), T response tokens, D width,
V vocabulary (token losses) or visual tokens (attention losses), H heads,
Q probed query rows, K sampled rows, N rewards, G group size.

Attention inputs are the model's probe outputs: float32[B, Q, V] (head
mean) or [B, H, Q, V] (per head), softmax probabilities over every key the
query sees, not renormalised over the visual columns; padding columns are
exactly 0.

The EASE target (Gaussian mixture over the merged visual-token grid, METHODS
3) is built on the host by `faithful_rl.data.targets.ease_target`; the
losses here take it as an input array.
"""

from __future__ import annotations

import fractions
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from faithful_rl.data.targets import ease_target  # noqa: F401  (public name)

Array = jax.Array
Metrics = dict[str, Array]

_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
_DIRECTIONS = ("target_to_model", "model_to_target")


# ------------------------------------------------------------------------------
# Masked reductions.
# ------------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, *, axis=None) -> Array:
  """Sum of `x` where `mask` (bool or float weights), ignoring masked NaNs."""
  mask = jnp.asarray(mask)
  x = jnp.where(mask != 0, x, 0.0)
  return jnp.sum(x * mask.astype(jnp.float32), axis=axis)


def masked_mean(x: Array, mask: Array, *, axis=None) -> Array:
  """Mean of `x` over `mask`; 0 (not NaN) where the mask is empty."""
  count = jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=axis)
  total = masked_sum(x, mask, axis=axis)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


# ------------------------------------------------------------------------------
# GRPO / DAPO.
# ------------------------------------------------------------------------------


def grpo_advantages(
    *,
    rewards: Array,
    group_ids: Array | None = None,
    group_size: int | None = None,
    eps: float = 1e-6,
    std_mode: str = "sample",
    scale: bool = True,
) -> Array:
  """Group-normalised advantages (METHODS 1).

  A_i = (R_i - mean_g R) / (std_g R + eps), or A_i = R_i - mean_g R with
  `scale=False` (Dr.GRPO). A group whose rewards are all equal gets exactly
  0 (the mean is not trusted to be exact in floating point).

  Args:
    rewards: float[N].
    group_ids: int[N], any integer labels; responses sharing a label form a
      group. Jittable (uses `jnp.unique(..., size=N)`).
    group_size: G, when the N rewards are N / G consecutive groups. Exactly
      one of `group_ids` and `group_size` is given.
    eps: added to the std.
    std_mode: 'sample' (ddof = 1, as torch.std in the GRPO reference code) or
      'population' (ddof = 0). A group of one has std 0 either way.
    scale: divide by the std.

  Returns:
    float32[N] advantages.
  """
  r = jnp.asarray(rewards, jnp.float32)
  n = r.shape[0]
  if (group_ids is None) == (group_size is None):
    raise ValueError("Give exactly one of group_ids and group_size.")
  if std_mode not in ("sample", "population"):
    raise ValueError(f"std_mode must be sample|population, got {std_mode!r}")
  if group_size is not None:
    if n % group_size:
      raise ValueError(f"{n} rewards are not groups of {group_size}.")
    ids = jnp.repeat(jnp.arange(n // group_size), group_size)
  else:
    _, ids = jnp.unique(
        jnp.asarray(group_ids), return_inverse=True, size=n, fill_value=0
    )
    ids = ids.reshape(n)
  seg = lambda f, x: f(x, ids, num_segments=n)
  count = seg(jax.ops.segment_sum, jnp.ones_like(r))
  mean = seg(jax.ops.segment_sum, r) / jnp.maximum(count, 1.0)
  centred = r - mean[ids]
  ddof = 1.0 if std_mode == "sample" else 0.0
  var = seg(jax.ops.segment_sum, centred**2) / jnp.maximum(count - ddof, 1.0)
  std = jnp.sqrt(var)[ids]
  equal = seg(jax.ops.segment_max, r)[ids] == seg(jax.ops.segment_min, r)[ids]
  adv = centred / (std + eps) if scale else centred
  return jnp.where(equal, 0.0, adv)


def _k3(log_ratio: Array) -> Array:
  """k3 estimator exp(x) - x - 1 of KL, with x = lp_other - lp."""
  return jnp.exp(log_ratio) - log_ratio - 1.0


def policy_loss(
    *,
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "token-mean",
    ref_logp: Array | None = None,
    kl_beta: float = 0.0,
    token_weights: Array | None = None,
) -> tuple[Array, Metrics]:
  """Clipped surrogate with optional k3 reference KL (METHODS 1, 2, 5).

  Per token: l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
  + kl_beta * (exp(lp_ref - lp) - (lp_ref - lp) - 1), r = exp(lp - lp_old).
  `token_weights` multiplies l (pg and KL terms alike) before aggregation
  without changing the denominators: VPPO's filter passes its 0/1 top-k
  mask, so unselected tokens get no gradient but still count.

  Aggregations (denominators count mask tokens; responses with no token are
  left out of the response means):
    token-mean: sum over all tokens of all responses / total tokens (DAPO).
    seq-mean-token-mean: per-response token mean, then mean over responses
      (GRPO).
    seq-mean-token-sum: per-response token sum, then mean over responses.

  Args:
    logp: float32[B, T] log-probs under the policy being trained.
    old_logp: float32[B, T] log-probs under the sampling policy.
    advantages: float[B] (one per response) or float[B, T].
    mask: [B, T] response-token mask (bool or 0/1).
    clip_low: eps_low.
    clip_high: eps_high (0.28 in DAPO).
    aggregation: one of the three above.
    ref_logp: float32[B, T] reference-policy log-probs, needed if kl_beta > 0.
    kl_beta: weight of the k3 reference KL.
    token_weights: optional float[B, T] per-token loss weights.

  Returns:
    (loss, metrics): metrics hold clip_frac_low / clip_frac_high (share of
    tokens where the clipped branch is active, i.e. the gradient is zero),
    approx_kl (k3 estimate of KL(old || new)), ratio_mean, ratio_max,
    kl_ref, pg_loss (token mean of the unweighted surrogate).
  """
  if aggregation not in _AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {_AGGREGATIONS}.")
  if kl_beta and ref_logp is None:
    raise ValueError("kl_beta > 0 needs ref_logp.")
  logp = jnp.asarray(logp, jnp.float32)
  old_logp = jnp.asarray(old_logp, jnp.float32)
  mask = jnp.asarray(mask).astype(jnp.float32)
  adv = jnp.asarray(advantages, jnp.float32)
  if adv.ndim == 1:
    adv = adv[:, None]
  adv = jnp.broadcast_to(adv, logp.shape)

  log_ratio = jnp.where(mask > 0, logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  pg = -jnp.minimum(ratio * adv, clipped * adv)
  per_token = pg
  kl_ref = jnp.zeros_like(pg)
  if ref_logp is not None:
    ref_lr = jnp.where(mask > 0, jnp.asarray(ref_logp, jnp.float32) - logp, 0)
    kl_ref = _k3(ref_lr)
    per_token = per_token + kl_beta * kl_ref
  if token_weights is not None:
    per_token = per_token * jnp.asarray(token_weights, jnp.float32)

  if aggregation == "token-mean":
    loss = masked_sum(per_token, mask) / jnp.maximum(mask.sum(), 1.0)
  else:
    seq = masked_sum(per_token, mask, axis=-1)
    lengths = mask.sum(-1)
    if aggregation == "seq-mean-token-mean":
      seq = seq / jnp.maximum(lengths, 1.0)
    loss = masked_mean(seq, lengths > 0)

  sg = jax.lax.stop_gradient
  metrics = {
      "clip_frac_low": masked_mean((ratio < 1 - clip_low) & (adv < 0), mask),
      "clip_frac_high": masked_mean((ratio > 1 + clip_high) & (adv > 0), mask),
      "approx_kl": masked_mean(_k3(-log_ratio), mask),
      "ratio_mean": masked_mean(ratio, mask),
      "ratio_max": jnp.max(jnp.where(mask > 0, ratio, -jnp.inf)),
      "kl_ref": masked_mean(kl_ref, mask),
      "pg_loss": masked_mean(pg, mask),
  }
  return loss, jax.tree.map(sg, metrics)


def grpo_loss(
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: str = "seq-mean-token-mean",
    kl_beta: float = 0.04,
    **kwargs: Any,
) -> tuple[Array, Metrics]:
  """`policy_loss` with GRPO's defaults (METHODS 1).

  Symmetric clip 0.2, per-response token mean, k3 reference KL with beta
  0.04 (so `ref_logp` is needed unless `kl_beta=0`).
  """
  return policy_loss(
      clip_low=clip_low,
      clip_high=clip_high,
      aggregation=aggregation,
      kl_beta=kl_beta,
      **kwargs,
  )


def dapo_loss(
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: str = "token-mean",
    kl_beta: float = 0.0,
    **kwargs: Any,
) -> tuple[Array, Metrics]:
  """`policy_loss` with DAPO's defaults (METHODS 2).

  Clip-higher (0.2, 0.28), token-mean aggregation, no reference KL.
  """
  return policy_loss(
      clip_low=clip_low,
      clip_high=clip_high,
      aggregation=aggregation,
      kl_beta=kl_beta,
      **kwargs,
  )


def overlong_penalty(*, lengths: Array, max_len: int, cache_len: int) -> Array:
  """DAPO soft overlong punishment (METHODS 2), float32 like `lengths`.

  0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if
  L_max - L_cache < |y| <= L_max; -1 if |y| > L_max. With cache_len = 0 the
  linear part is empty.
  """
  y = jnp.asarray(lengths, jnp.float32)
  soft = float(max_len - cache_len)
  linear = (soft - y) / float(max(cache_len, 1))
  return jnp.where(y <= soft, 0.0, jnp.where(y <= max_len, linear, -1.0))


def overlong_filter_mask(*, truncated: Array, mask: Array | None = None):
  """Overlong filtering: truncated responses leave the loss.

  Returns float32[B] keep weights (0 for truncated responses), or, given
  `mask` [B, T], the mask as float32 with truncated responses' rows zeroed.
  """
  keep = 1.0 - jnp.asarray(truncated).astype(jnp.float32)
  if mask is None:
    return keep
  return jnp.asarray(mask).astype(jnp.float32) * keep[:, None]


def zero_variance_groups(rewards, group_size: int) -> np.ndarray:
  """bool[N / G]: True for groups whose G rewards are all equal (host-side)."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  return np.all(r == r[:, :1], axis=1)


def select_groups(rewards, group_size: int, max_groups: int) -> np.ndarray:
  """DAPO dynamic sampling for one generation round (host-side).

  Args:
    rewards: float[N], N / G consecutive groups of G.
    group_size: G.
    max_groups: how many more groups the training batch needs.

  Returns:
    int64[<= max_groups]: indices of the informative (non-zero-variance)
    groups, first come first kept, in increasing order.
  """
  informative = np.flatnonzero(~zero_variance_groups(rewards, group_size))
  return informative[: max(int(max_groups), 0)]


# ------------------------------------------------------------------------------
# Token log-probs and entropy.
# ------------------------------------------------------------------------------


def token_entropy(logits: Array) -> Array:
  """Entropy float32[...] of softmax(logits[..., V]) in float32.

  H = logsumexp(z) - sum softmax(z) z; -inf logits (masked vocabulary) are
  handled without NaN.
  """
  z = jnp.asarray(logits, jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  p = jnp.exp(z - lse[..., None])
  z_safe = jnp.where(jnp.isfinite(z), z, 0.0)
  return lse - jnp.sum(p * z_safe, axis=-1)


def token_logprobs(
    logits: Array, targets: Array, *, temperature: float = 1.0
) -> Array:
  """log softmax(logits / temperature)[targets], float32[...].

  Args:
    logits: [..., V] (any float dtype; upcast to float32).
    targets: int[...].
    temperature: sampling temperature the tokens were drawn at.
  """
  z = jnp.asarray(logits, jnp.float32) / temperature
  idx = jnp.asarray(targets, jnp.int32)[..., None]
  picked = jnp.take_along_axis(z, idx, -1)
  return picked[..., 0] - jax.nn.logsumexp(z, axis=-1)


def chunked_token_logprobs(
    hidden: Array,
    head: Array,
    targets: Array,
    chunk: int = 256,
    *,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
  """Token log-probs and entropies without the full [B, T, V] logits.

  The T axis is cut into chunks of `chunk` positions; a rematerialised
  `lax.map` computes float32 logits of one chunk at a time in the forward
  and again in the backward, so at most [B, chunk, V] float32 logits are
  live.

  Args:
    hidden: [B, T, D] final hidden states (the LM head's input).
    head: [D, V] LM head (the embedding transposed when tied).
    targets: int[B, T] next tokens.
    chunk: positions per chunk; T is padded to a multiple of it.
    temperature: divides the logits.

  Returns:
    (logp float32[B, T], entropy float32[B, T]).
  """
  b, t, d = hidden.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(targets, ((0, 0), (0, pad)))
  h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
  y = y.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    hc, yc = args
    z = jnp.einsum("bcd,dv->bcv", hc, head, preferred_element_type=jnp.float32)
    z = z / temperature
    return token_logprobs(z, yc), token_entropy(z)

  lp, ent = jax.lax.map(one, (h, y))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(lp), unchunk(ent)


# ------------------------------------------------------------------------------
# EASE: evidence-anchored attention (METHODS 3).
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

  'target_to_model' is KL(t || a) (the default, METHODS 3), mass-covering:
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

  Returns:
    (loss, metrics): gate_coverage (share of trajectories counted),
    attn_kl (mean KL over counted), attn_kl_all (mean over all with a
    target), and with `evidence_mask`, evidence_mass (share of visual
    attention inside the evidence) and pointing_hit (argmax visual token
    inside the evidence), both averaged over trajectories with evidence.
  """
  valid = jnp.asarray(valid).astype(bool)
  r = jnp.asarray(rewards, jnp.float32)
  has_t = jnp.any((jnp.asarray(target) > 0) & valid, axis=-1)
  if target_mask is not None:
    has_t = has_t & jnp.asarray(target_mask).astype(bool)
  counted = has_t & (r >= tau) if gate else has_t
  att = _head_mean(attention)
  safe = jnp.broadcast_to(valid[:, None, :].astype(jnp.float32), att.shape)
  att_in = jnp.where(counted[:, None, None], att, safe)
  kw = dict(valid=valid, query_mask=query_mask, renormalize=renormalize)
  kl = attention_kl(
      attention=att_in, target=target, direction=direction, eps=eps, **kw
  )
  loss = masked_mean(kl, counted)

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


def sample_query_rows(
    rng: Array, response_mask: Array, k: int = 64, offset: Array | int = 0
) -> tuple[Array, Array]:
  """Up to K response tokens per trajectory, uniformly without replacement.

  Args:
    rng: PRNG key.
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
# Faithful-MR1: anchoring and reinforcing (METHODS 4).
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
) -> tuple[Array, Metrics]:
  """Faithful-MR1 anchoring loss (METHODS 4).

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
  loss = masked_mean(kl, has_t)
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


# ------------------------------------------------------------------------------
# VPPO (METHODS 5).
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


__all__ = [
    "anchor_loss",
    "attention_kl",
    "attention_mass_reward",
    "causal_effect",
    "chunked_token_logprobs",
    "dapo_loss",
    "ease_loss",
    "grpo_advantages",
    "grpo_loss",
    "masked_mean",
    "masked_sum",
    "overlong_filter_mask",
    "overlong_penalty",
    "policy_loss",
    "sample_query_rows",
    "select_groups",
    "token_entropy",
    "token_logprobs",
    "topk_token_mask",
    "trajectory_attention",
    "visual_dependency",
    "vppo_advantage_scale",
    "zero_variance_groups",
]
