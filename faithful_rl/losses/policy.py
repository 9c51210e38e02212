"""Policy-gradient losses: GRPO, DAPO and their token log-probs (docs/methods.md 1-2).

Axis alphabet: B responses, T response tokens, D width, V vocabulary, N
rewards, G group size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from faithful_rl.losses.reductions import masked_mean
from faithful_rl.losses.reductions import masked_sum

Array = jax.Array
Metrics = dict[str, Array]
_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


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
  """Group-normalised advantages (docs/methods.md 1).

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
    clip_ratio_c: float = 3.0,
    normalizer: Array | float | None = None,
) -> tuple[Array, Metrics]:
  """Clipped surrogate with optional k3 reference KL (docs/methods.md 1, 2).

  Per token: pg = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), and for
  A < 0 the dual clip caps it: pg = min(pg, -clip_ratio_c A), so a token
  whose ratio exploded adds at most c |A| and no gradient (verl and VPPO,
  c = 3; 0 turns it off). l = pg + kl_beta * (exp(lp_ref - lp) - (lp_ref -
  lp) - 1), r = exp(lp - lp_old). `token_weights` multiplies l (pg and KL
  terms alike) before aggregation without changing the denominators:
  VPPO's filter passes its 0/1 top-k mask, so unselected tokens get no
  gradient but still count.

  Aggregations (denominators count mask tokens; responses with no token are
  left out of the response means):
    token-mean: sum over all tokens of all responses / total tokens (DAPO).
    seq-mean-token-mean: per-response token mean, then mean over responses
      (GRPO).
    seq-mean-token-sum: per-response token sum, then mean over responses.
  `normalizer` replaces the denominator (total tokens, or responses with a
  token): given the whole minibatch's count, the losses of its micro-batches
  sum to the minibatch's loss, so gradient accumulation is exact.

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
    clip_ratio_c: the dual-clip constant c (> 1), or 0 for no dual clip.
    normalizer: the aggregation's denominator (default: this batch's).

  Returns:
    (loss, metrics): metrics hold clip_frac_low / clip_frac_high (share of
    tokens where the clipped branch is active, i.e. the gradient is zero),
    clip_frac_dual (share where the dual clip caps the loss), approx_kl (k3
    estimate of KL(old || new)), ratio_mean, ratio_max, kl_ref, pg_loss
    (token mean of the unweighted surrogate).
  """
  if aggregation not in _AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {_AGGREGATIONS}.")
  if kl_beta and ref_logp is None:
    raise ValueError("kl_beta > 0 needs ref_logp.")
  if clip_ratio_c and clip_ratio_c <= 1.0:
    raise ValueError(f"clip_ratio_c must be > 1 (or 0: off): {clip_ratio_c}")
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
  dual = jnp.zeros(pg.shape, bool)
  if clip_ratio_c:
    cap = -clip_ratio_c * adv
    dual = (adv < 0) & (pg > cap)
    pg = jnp.where(dual, cap, pg)
  per_token = pg
  kl_ref = jnp.zeros_like(pg)
  if ref_logp is not None:
    ref_lr = jnp.where(mask > 0, jnp.asarray(ref_logp, jnp.float32) - logp, 0)
    kl_ref = _k3(ref_lr)
    per_token = per_token + kl_beta * kl_ref
  if token_weights is not None:
    per_token = per_token * jnp.asarray(token_weights, jnp.float32)

  if aggregation == "token-mean":
    total = masked_sum(per_token, mask)
    count = mask.sum()
  else:
    seq = masked_sum(per_token, mask, axis=-1)
    lengths = mask.sum(-1)
    if aggregation == "seq-mean-token-mean":
      seq = seq / jnp.maximum(lengths, 1.0)
    total = masked_sum(seq, lengths > 0)
    count = (lengths > 0).sum().astype(jnp.float32)
  if normalizer is not None:
    count = jnp.asarray(normalizer, jnp.float32)
  loss = total / jnp.maximum(count, 1.0)

  sg = jax.lax.stop_gradient
  metrics = {
      "clip_frac_low": masked_mean((ratio < 1 - clip_low) & (adv < 0), mask),
      "clip_frac_high": masked_mean((ratio > 1 + clip_high) & (adv > 0), mask),
      "clip_frac_dual": masked_mean(dual, mask),
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
  """`policy_loss` with GRPO's defaults (docs/methods.md 1).

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
  """`policy_loss` with DAPO's defaults (docs/methods.md 2).

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
  """DAPO soft overlong punishment (docs/methods.md 2), float32 like `lengths`.

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
