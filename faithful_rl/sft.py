"""The SFT (+ Faithful-MR1 anchoring) stage's step, as the RL learner's.

`Learner.step(state, rng) -> (state, metrics)`: the next batch of this
process's share of the data, placed on the mesh, as micro-batches of
`sft.micro_batch` rows, through one jitted update (`steps.make_update`
with `SFT`: `sft_loss` over each micro-batch, normalised by `sft_totals`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl import forward
from faithful_rl import losses
from faithful_rl import metrics as metrics_lib
from faithful_rl import optim
from faithful_rl import sharding
from faithful_rl import steps
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import visual_token_positions

KEYS = (
    "prompt_ids", "prompt_mask", "position_ids", "vision", "focus_target",
    "has_boxes", "response_ids", "response_mask", "example_mask",
)  # fmt: skip


# ---------------------------------------------------------------------------
# The SFT objective: a loss over one micro-batch, and the minibatch's totals.
# ---------------------------------------------------------------------------


def _sft_prompt(batch: dict) -> dict:
  return dict(
      prompt_ids=batch["prompt_ids"],
      prompt_mask=batch["prompt_mask"],
      position_ids=jnp.swapaxes(batch["position_ids"], 0, 1),
      vision=batch["vision"],
  )


def sft_totals(batch: dict, cfg: steps.SFTConfig, image_token_id: int) -> dict:
  """Response tokens and (with anchoring) supervised examples."""
  mask = batch["response_mask"] & batch["example_mask"][..., None]
  out = {"tokens": mask.sum().astype(jnp.float32)}
  if cfg.anchor.enabled:
    v = batch["focus_target"].shape[-1]
    valid = jax.vmap(
        lambda ids: visual_token_positions(ids, image_token_id, v)[1]
    )(batch["prompt_ids"])
    has_t = jnp.any((batch["focus_target"] > 0) & valid, -1)
    has_t = has_t & batch["has_boxes"] & batch["example_mask"]
    out["anchor"] = has_t.sum().astype(jnp.float32)
  return out


def sft_loss(params, graphdef, batch: dict, rng, cfg: steps.SFTConfig, totals):
  """Teacher-forced cross-entropy on reference responses (+ anchoring).

  Token-mean over the minibatch's response tokens. With anchoring, the
  probe reads the attention row of the first response token (<Focus>) over
  the visual tokens and adds `weight * KL(focus target || row)`, averaged
  over the minibatch's examples with boxes.
  """
  del rng
  model = nnx.merge(graphdef, params)
  tokens, mask = batch["response_ids"], batch["response_mask"]
  mask = mask & batch["example_mask"][:, None]
  probe = None
  if cfg.anchor.enabled:
    v = batch["focus_target"].shape[1]
    kpos, kvalid = visual_token_positions(
        batch["prompt_ids"], model.config.image_token_id, v
    )
    probe = AttentionProbe(
        query_positions=jnp.zeros((tokens.shape[0], 1), jnp.int32),
        key_positions=kpos,
        key_valid=kvalid,
        layers=forward.probe_layers(cfg.anchor.layers, model),
    )
  logp, ent, out = forward.score(
      model, _sft_prompt(batch), tokens, mask, num_samples=1, probe=probe
  )
  ce = -losses.masked_mean(logp, mask, count=totals["tokens"])
  metrics = {
      "ce": ce,
      "token_accuracy": losses.masked_mean(
          (jnp.exp(logp) > 0.5).astype(jnp.float32), mask
      ),
      "entropy": losses.masked_mean(ent, mask),
      "response_tokens": mask.sum(),
  }
  total = ce
  if cfg.anchor.enabled:
    anchor, m = losses.anchor_loss(
        focus_attention=out.visual_attention,
        focus_target=batch["focus_target"],
        valid=kvalid,
        example_mask=batch["has_boxes"] & batch["example_mask"],
        renormalize=cfg.anchor.renormalize,
        direction=cfg.anchor.direction,
        normalizer=totals["anchor"],
    )
    total = total + cfg.anchor.weight * anchor
    metrics.update({f"anchor/{k}": v for k, v in m.items()})
    metrics["anchor/loss"] = anchor
  metrics["loss"] = total
  return total, metrics


SFT = steps.Objective(loss=sft_loss, totals=sft_totals)


# ---------------------------------------------------------------------------
# The learner.
# ---------------------------------------------------------------------------


def micro_batches(batch: dict, rows: int):
  """[B, ...] -> [B / rows, rows, ...], micro-batch m holding rows m, m + M,
  m + 2M, ...: each micro-batch takes rows from every device's block, so
  the rows stay spread over the batch axes with no data movement."""
  b = jax.tree.leaves(batch)[0].shape[0]
  if b % rows:
    raise ValueError(f"sft.micro_batch={rows} does not divide the batch {b}")
  m = b // rows
  return jax.tree.map(
      lambda x: x.reshape((rows, m) + x.shape[1:]).swapaxes(0, 1), batch
  )


def nan_at(step: int) -> Callable[[int, dict], None]:
  """A test hook: the batch of global step `step` gets NaN pixels."""

  def hook(at: int, batch: dict) -> None:
    if at == step:
      batch["vision"].pixel_values[:] = np.nan

  return hook


class Learner:
  """The SFT stage's step.

  Args:
    config: the run's config (`config.sft` is read).
    graphdef, tx, mesh, state_shardings: as `rl.Learner`.
    batches: this process's share of the SFT batches (an iterator of
      `batching.Batch`).
    first_step: the global step of the first `step` call (host-side, so
      that hooks see the step without reading the device's).
    hooks: callables `hook(step, batch)` run on each host batch before
      the update (fault injection in tests: `nan_at`).
    saved: what `saved()` returned at the checkpoint resumed from (SFT
      keeps nothing beyond the train state).
  """

  def __init__(self, config, *, graphdef, tx, mesh, batches,
               state_shardings=None, first_step: int = 0,
               hooks: Sequence[Callable[[int, dict], None]] = (),
               saved=None):  # fmt: skip
    del saved
    self.mesh, self.batches = mesh, batches
    self.micro_batch = int(config.sft.micro_batch)
    self.next_step, self.hooks = first_step, tuple(hooks)
    cfg = steps.SFTConfig.from_config(config.sft)
    update = steps.make_update(
        SFT,
        tx,
        graphdef,
        cfg,
        state_shardings=state_shardings,
        frozen=optim.frozen_patterns(config.sft.optim),
    )
    layout = jax.jit(micro_batches, static_argnums=1)
    self._update = lambda s, b, r: update(s, layout(b, self.micro_batch), r)

  def saved(self) -> dict:
    """What a checkpoint keeps of the learner beyond the train state."""
    return {}

  def step(self, state: steps.TrainState, rng) -> tuple[Any, dict]:
    arrays = next(self.batches).arrays
    batch = {k: arrays[k] for k in KEYS}
    batch["position_ids"] = np.swapaxes(batch["position_ids"], 0, 1)
    for hook in self.hooks:
      hook(self.next_step, batch)
    self.next_step += 1
    state, m = self._update(state, sharding.global_batch(self.mesh, batch), rng)
    return state, metrics_lib.scalars(jax.device_get(m))
