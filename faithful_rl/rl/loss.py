"""The RL objective: the update's loss over one micro-batch and its totals.

  RL = steps.Objective(loss=rl_loss, totals=rl_totals)
  steps.make_update(RL, tx, graphdef, cfg)  # what `rl.Learner` runs

`rl_loss` scores the micro-batch with `forward.score` (the training
forward, with the EASE probe when enabled) and applies the policy loss
named `rl.loss` (+ reference KL) and the EASE loss; `rl_totals` counts the
whole minibatch's tokens, responses and supervised trajectories, so that
gradient accumulation over micro-batches is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl import forward
from faithful_rl import losses
from faithful_rl import steps
from faithful_rl.models.qwen2_5_vl import visual_token_positions
from faithful_rl.rl.batch import RolloutBatch
from faithful_rl.rl.batch import repeat_rows


def rl_totals(batch: RolloutBatch, cfg: steps.RLConfig, image_token_id: int):
  """Tokens, responses with a token and (EASE) supervised trajectories."""
  mask = batch.mask
  out = {
      "tokens": mask.sum().astype(jnp.float32),
      "responses": mask.any(-1).sum().astype(jnp.float32),
  }
  if cfg.ease.enabled:

    def counted(b: RolloutBatch):
      g, v = b.rows_per_prompt, b.ease_target.shape[-1]
      valid = visual_token_positions(b.prompt_ids, image_token_id, v)[1]
      skip = cfg.ease.no_box == "skip"
      return losses.ease_counted(
          target=repeat_rows(b.ease_target, g),
          valid=repeat_rows(valid, g),
          rewards=b.correct,
          target_mask=repeat_rows(b.has_boxes, g) if skip else None,
          tau=cfg.ease.tau,
          gate=cfg.ease.gate,
      ).sum()

    stacked = batch.prompt_ids.ndim == 3
    n = jax.vmap(counted)(batch).sum() if stacked else counted(batch)
    out["ease"] = n.astype(jnp.float32)
  return out


def rl_loss(
    params, graphdef, batch: RolloutBatch, rng, cfg: steps.RLConfig, totals
):
  """The policy loss named `cfg.loss` (+ reference KL) + lambda * EASE."""
  model = nnx.merge(graphdef, params)
  g = batch.rows_per_prompt
  tokens, mask = batch.tokens, batch.mask
  probe, qvalid, kvalid = None, None, None
  if cfg.ease.enabled:
    keys = forward.row_keys(rng, batch.row_ids)
    probe, qvalid, kvalid = forward.probe_rows(
        model, batch.prompt_ids, batch.ease_target.shape[1], mask, keys, g,
        cfg.ease.num_queries, cfg.ease.layers,
    )  # fmt: skip
  logp, ent, out = forward.score(
      model,
      batch.prompt_inputs(),
      tokens,
      mask,
      num_samples=g,
      temperature=cfg.temperature,
      probe=probe,
  )
  policy = losses.get("policy", cfg.loss)
  token_mean = cfg.aggregation == "token-mean"
  pg, metrics = policy(
      logp=logp,
      old_logp=batch.old_logp,
      advantages=batch.advantages,
      mask=mask,
      ref_logp=batch.ref_logp,
      token_weights=batch.token_weights,
      normalizer=totals["tokens" if token_mean else "responses"],
      clip_low=cfg.clip_low,
      clip_high=cfg.clip_high,
      clip_ratio_c=cfg.clip_ratio_c,
      aggregation=cfg.aggregation,
      kl_beta=cfg.kl_beta,
  )
  metrics = dict(metrics)
  metrics["entropy"] = losses.masked_mean(ent, mask)
  total = pg
  if cfg.ease.enabled:
    skip = cfg.ease.no_box == "skip"
    attn, m = losses.get("attention", cfg.ease.loss)(
        attention=out.visual_attention,
        target=repeat_rows(batch.ease_target, g),
        valid=kvalid,
        rewards=batch.correct,
        query_mask=qvalid,
        target_mask=repeat_rows(batch.has_boxes, g) if skip else None,
        evidence_mask=repeat_rows(batch.evidence_mask, g),
        tau=cfg.ease.tau,
        gate=cfg.ease.gate,
        renormalize=cfg.ease.renormalize,
        direction=cfg.ease.direction,
        normalizer=totals["ease"],
    )
    total = total + cfg.ease.weight * attn
    metrics.update({f"ease/{k}": v for k, v in m.items()})
    metrics["ease/loss"] = attn
  metrics["loss"] = total
  return total, metrics


RL = steps.Objective(loss=rl_loss, totals=rl_totals)
