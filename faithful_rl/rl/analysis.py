"""The RL step's no-gradient device passes: analysis, reference, advantages.

  analyze_chunks(params, graphdef, chunks, rng, cfg, black)  # per chunk
  reference_chunks(ref_params, graphdef, chunks, cfg)        # per chunk
  logp_gap(sampler_logp, recomputed, mask)  # rl.old_logp='recompute'
  finalize(batch, analysis, cfg)  # rewards, advantages, VPPO's weights

`chunks` is a `RolloutBatch` laid out as [M, ...] chunks (`batch.layout`);
`lax.map` runs one chunk at a time, so memory is bounded by the chunk
size. Every random draw is keyed by a row's `row_ids` (query rows) or a
prompt's `group_ids` (VPPO's perturbation), so chunking never changes it.
`finalize` calls the library's losses for every quantity (causal test,
attention reward, group advantages, VPPO's filter and scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl import forward
from faithful_rl import losses
from faithful_rl import sampling
from faithful_rl import steps
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.rl.batch import RolloutBatch
from faithful_rl.rl.batch import repeat_rows


def perturb_patches(
    vision: VisionInputs, rng, *, drop_prob: float, black: jax.Array
) -> VisionInputs:
  """VPPO's perturbed image: each 14-px patch blackened with prob p.

  `black` float[patch_dim] is a black patch after the processor's
  normalisation ((0 - mean) / std per channel). `rng`: one key, or one
  key per image (key[B]).
  """
  pix = vision.pixel_values
  if sampling.per_row_keys(rng):
    one = lambda key: jax.random.bernoulli(key, drop_prob, pix.shape[1:2])
    drop = jax.vmap(one)(rng)
  else:
    drop = jax.random.bernoulli(rng, drop_prob, pix.shape[:2])
  pix = jnp.where(drop[..., None], black.astype(pix.dtype), pix)
  return dataclasses.replace(vision, pixel_values=pix)


def analyze(
    params, graphdef, batch: RolloutBatch, rng, cfg: steps.RLConfig, black
):
  """Per-trajectory quantities the rewards and advantages need.

  Randomness is per row (query rows) and per prompt (VPPO's perturbation),
  from `row_ids` / `group_ids`, so chunking does not change it. Returns a
  dict with, as enabled:
    attention float32[n, V], key_valid bool[n, V]: the response's visual
      attention distribution (Faithful-MR1's reward reads it);
    evidence_mass float32[n]: its share on evidence tokens;
    logp_sum, logp_cf float32[n]: summed response log-prob on the original
      and the counterfactual image (the 'logprob_drop' test);
    dependency float32[n, R]: VPPO's token visual dependency S.
  """
  model = nnx.merge(graphdef, params)
  g = batch.rows_per_prompt
  tokens, mask = batch.tokens, batch.mask
  out: dict[str, Any] = {}
  r_cfg = cfg.reinforce
  k_probe, k_vppo = jax.random.split(rng)
  score = lambda vision: forward.score(
      model,
      batch.prompt_inputs(vision),
      tokens,
      mask,
      num_samples=g,
      temperature=cfg.temperature,
  )
  if r_cfg.enabled:
    a, kvalid, logp = forward.response_attention(
        model,
        batch.prompt_inputs(),
        tokens,
        mask,
        forward.row_keys(k_probe, batch.row_ids),
        num_visual=batch.ease_target.shape[1],
        num_samples=g,
        num_queries=r_cfg.num_queries,
        layers=r_cfg.layers,
        temperature=cfg.temperature,
    )
    ev = repeat_rows(batch.evidence_mask, g) & kvalid
    out["evidence_mass"] = jnp.sum(jnp.where(ev, a, 0.0), -1)
    out["attention"] = a
    out["key_valid"] = kvalid
    out["logp_sum"] = losses.masked_sum(logp, mask, axis=-1)
    if r_cfg.test == "logprob_drop":
      logp_cf, _, _ = score(batch.cf_vision)
      out["logp_cf"] = losses.masked_sum(logp_cf, mask, axis=-1)
  if cfg.vppo.enabled:
    perturbed = perturb_patches(
        batch.vision,
        forward.row_keys(k_vppo, batch.group_ids),
        drop_prob=cfg.vppo.drop_prob,
        black=black,
    )
    logp_p, _, _ = score(perturbed)
    out["dependency"] = losses.visual_dependency(
        logp_perturbed=logp_p, logp_orig=batch.old_logp, mask=mask
    )
  return out


def analyze_chunks(params, graphdef, chunks: RolloutBatch, rng, cfg, black):
  """`analyze` over [M, ...] chunks, one at a time (`lax.map`)."""
  return jax.lax.map(
      lambda c: analyze(params, graphdef, c, rng, cfg, black), chunks
  )


def reference_chunks(
    params, graphdef, chunks: RolloutBatch, cfg: steps.RLConfig
):
  """Log-probs of the sampled tokens under reference parameters, per chunk."""
  model = nnx.merge(graphdef, params)

  def one(c: RolloutBatch):
    logp, _, _ = forward.score(
        model,
        c.prompt_inputs(),
        c.tokens,
        c.mask,
        num_samples=c.rows_per_prompt,
        temperature=cfg.temperature,
    )
    return logp

  return jax.lax.map(one, chunks)


def logp_gap(sampler_logp, recomputed, mask) -> dict:
  """Mean and max |sampler - training forward| log-prob over real tokens.

  What `rl.old_logp='recompute'` corrects: the sampler (a KV-cache decode
  step) and the training forward run different kernels, and in bf16 they
  round differently. Under 1e-6 in float32; 0.03 nats per token on average
  for the 3B in bf16 on an H200 (`benchmarks/accelerator.py`).
  """
  m = jnp.asarray(mask, bool)
  d = jnp.where(m, jnp.abs(sampler_logp - recomputed), 0.0)
  return {
      "old_logp_gap_mean": d.sum() / jnp.maximum(m.sum(), 1),
      "old_logp_gap_max": d.max(),
  }


def finalize(batch: RolloutBatch, analysis: dict, cfg: steps.RLConfig):
  """Rewards (+ Faithful-MR1's attention reward), advantages, VPPO weights.

  Returns (the batch with `rewards`, `advantages` and `token_weights` set,
  scalar statistics of what was added).
  """
  g = batch.rows_per_prompt
  total = batch.rewards
  correct = batch.correct > 0.5
  stats: dict[str, Any] = {}
  rc = cfg.reinforce
  if rc.enabled:
    if rc.test == "rollout_flip":
      causal = losses.causal_effect(
          correct_orig=correct,
          correct_cf=batch.correct_cf > 0.5,
          test="rollout_flip",
      )
    else:
      causal = losses.causal_effect(
          logp_orig=analysis["logp_sum"],
          logp_cf=analysis["logp_cf"],
          test="logprob_drop",
          margin=rc.margin,
      )
    bonus = losses.attention_mass_reward(
        attention=analysis["attention"],
        evidence_mask=repeat_rows(batch.evidence_mask, g),
        valid=analysis["key_valid"],
        correct=correct,
        causal=causal,
        lambda_attn=rc.lambda_attn,
    )
    total = total + bonus
    stats["mr1/causal_rate"] = causal.mean()
    stats["mr1/causal_rate_correct"] = losses.masked_mean(causal, correct)
    stats["mr1/attention_reward"] = bonus.mean()
    stats["mr1/evidence_mass"] = analysis["evidence_mass"].mean()
  adv = losses.grpo_advantages(
      rewards=total,
      group_size=g,
      std_mode=cfg.std_mode,
      scale=cfg.scale_advantages,
  )
  weights = batch.token_weights
  if cfg.vppo.enabled:
    dep = analysis["dependency"]
    weights = losses.topk_token_mask(
        scores=dep, mask=batch.mask, frac=cfg.vppo.topk
    ).astype(jnp.float32)
    seq = losses.masked_mean(dep, batch.mask, axis=-1)
    valid = batch.mask.any(-1)  # responses overlong filtering left empty
    mult = losses.vppo_advantage_scale(
        seq_scores=seq, beta_min=cfg.vppo.beta_min, valid=valid
    )
    adv = adv * mult
    stats["vppo/dependency"] = losses.masked_mean(seq, valid)
    stats["vppo/multiplier_max"] = jnp.max(jnp.where(valid, mult, 0.0))
  batch = dataclasses.replace(
      batch, rewards=total, advantages=adv, token_weights=weights
  )
  return batch, stats
