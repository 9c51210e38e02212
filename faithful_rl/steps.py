"""Pure, jittable training steps: SFT (+ anchoring) and RL (+ EASE) updates.

Everything here maps (params, batch, rng) to numbers; the learners
(`rl.Learner`, `sft.Learner`) own the loops. Parameters are a pure dict
(`nnx.to_pure_dict`) merged with the model's graphdef inside the step, so
the jit boundary sees plain pytrees. Method switches are frozen
dataclasses (static under jit) read from the ml_collections config by
`*.from_config`; the config (configs/common.py) is their only source of
defaults.

An update step takes a minibatch as micro-batches, a leading axis
[M, rows, ...], and scans over it, accumulating float32 gradients, before
one optimizer update. Each micro-batch's loss is normalised by the whole
minibatch's counts (`Objective.totals`), so the accumulated gradient is
the minibatch's gradient whatever M is.

RL batches are `rl.batch.RolloutBatch`es; SFT batches are the dicts of
`data.batching.collate` with `position_ids` batch-major [B, 3, Tp]. The
RL step's no-gradient passes are in `rl.analysis`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from faithful_rl import losses
from faithful_rl import rollout
from faithful_rl import sharding as sharding_lib
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import visual_token_positions
from faithful_rl.rl.batch import RolloutBatch
from faithful_rl.rl.batch import repeat_rows


def _from(cls, block, what: str, **extra):
  """`cls` from a config block holding exactly its fields (names checked)."""
  block = dict(block or {})
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(block) - names - set(extra))
  if unknown and cls is not RLConfig:
    raise ValueError(f"config.{what} has unknown keys {unknown}")
  kwargs = {k: v for k, v in block.items() if k in names}
  kwargs.update(extra)
  missing = sorted(names - set(kwargs))
  if missing:
    raise ValueError(f"config.{what} lacks {missing}")
  for k, v in kwargs.items():
    if isinstance(v, list):
      kwargs[k] = tuple(v)
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class EaseConfig:
  """EASE (docs/methods.md 3); `loss` names an "attention" loss."""

  enabled: bool
  loss: str
  weight: float
  tau: float
  gate: bool
  layers: tuple[int, ...]  # () means floor(2L/3)
  num_queries: int
  renormalize: bool
  direction: str
  no_box: str  # 'uniform' target, or 'skip' the example


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Faithful-MR1 Anchoring (docs/methods.md 4): KL of the <Focus> row."""

  enabled: bool
  weight: float
  layers: tuple[int, ...]
  renormalize: bool
  direction: str


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
  """Faithful-MR1 Reinforcing (docs/methods.md 4)."""

  enabled: bool
  lambda_attn: float
  test: str  # 'logprob_drop' or 'rollout_flip'
  margin: float
  layers: tuple[int, ...]
  num_queries: int


@dataclasses.dataclass(frozen=True)
class VppoConfig:
  """VPPO (docs/methods.md 5)."""

  enabled: bool
  drop_prob: float
  topk: float
  beta_min: float


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """What the RL loss, the analysis and the advantages read (static)."""

  loss: str  # a "policy" loss name (losses.registry)
  num_samples: int
  temperature: float
  clip_low: float
  clip_high: float
  clip_ratio_c: float
  aggregation: str
  kl_beta: float
  std_mode: str
  scale_advantages: bool
  ease: EaseConfig
  reinforce: ReinforceConfig
  vppo: VppoConfig

  @classmethod
  def from_config(cls, rl, **overrides) -> "RLConfig":
    """From `config.rl`; `overrides` replace fields (tests, benchmarks)."""
    subs = dict(
        ease=_from(EaseConfig, rl.get("ease"), "rl.ease"),
        reinforce=_from(ReinforceConfig, rl.get("reinforce"), "rl.reinforce"),
        vppo=_from(VppoConfig, rl.get("vppo"), "rl.vppo"),
    )
    for name, cls_ in (("ease", EaseConfig), ("reinforce", ReinforceConfig),
                       ("vppo", VppoConfig)):  # fmt: skip
      if isinstance(overrides.get(name), dict):
        overrides[name] = dataclasses.replace(subs[name], **overrides[name])
    extra = dict(temperature=rl.sampling.temperature, **subs)
    extra.update(overrides)
    cfg = _from(cls, rl, "rl", **extra)
    losses.get("policy", cfg.loss)  # a clear error for an unknown name
    if cfg.ease.enabled:
      losses.get("attention", cfg.ease.loss)
    return cfg


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  anchor: AnchorConfig

  @classmethod
  def from_config(cls, sft) -> "SFTConfig":
    return cls(anchor=_from(AnchorConfig, sft.get("anchor"), "sft.anchor"))


def probe_layers(layers: tuple[int, ...], model) -> tuple[int, ...]:
  return tuple(layers) or (model.config.default_probe_layer,)


def probe_rows(
    model, prompt_ids, num_visual, mask, rng, g, num_queries, layers
):
  """Probe of up to K sampled response rows over the visual tokens.

  `rng`: one key, or one key per row. Returns (probe, query_valid bool[n,
  K], key_valid bool[n, V]).
  """
  qpos, qvalid = losses.sample_query_rows(rng, mask, k=num_queries)
  kpos, kvalid = visual_token_positions(
      prompt_ids, model.config.image_token_id, num_visual
  )
  kpos, kvalid = repeat_rows((kpos, kvalid), g)
  probe = AttentionProbe(
      query_positions=qpos,
      key_positions=kpos,
      key_valid=kvalid,
      layers=probe_layers(layers, model),
  )
  return probe, qvalid, kvalid


def response_probe(model, batch, mask, rng, g, num_queries, layers):
  """`probe_rows` for a dict batch (prompt_ids, ease_target)."""
  v = batch["ease_target"].shape[1]
  return probe_rows(model, batch["prompt_ids"], v, mask, rng, g, num_queries,
                layers)  # fmt: skip


def row_keys(rng, row_ids):
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)


def _visual_valid(model, prompt_ids, num_visual):
  return visual_token_positions(
      prompt_ids, model.config.image_token_id, num_visual
  )[1]


# ---------------------------------------------------------------------------
# Objectives: a loss over one micro-batch, and the minibatch's totals.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss and the minibatch-wide counts that normalise it.

  loss(params, graphdef, micro, rng, cfg, totals) -> (loss, metrics), for
  one micro-batch; totals(batch, cfg, image_token_id) -> {name: float32
  scalar} over the whole minibatch [M, rows, ...].
  """

  loss: Callable
  totals: Callable


def _sft_prompt(batch: dict) -> dict:
  return dict(
      prompt_ids=batch["prompt_ids"],
      prompt_mask=batch["prompt_mask"],
      position_ids=jnp.swapaxes(batch["position_ids"], 0, 1),
      vision=batch["vision"],
  )


def sft_totals(batch: dict, cfg: "SFTConfig", image_token_id: int) -> dict:
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


def sft_loss(params, graphdef, batch: dict, rng, cfg: SFTConfig, totals):
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
        layers=probe_layers(cfg.anchor.layers, model),
    )
  logp, ent, out = rollout.score(
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


def rl_totals(batch: RolloutBatch, cfg: RLConfig, image_token_id: int):
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


def rl_loss(params, graphdef, batch: RolloutBatch, rng, cfg: RLConfig, totals):
  """The policy loss named `cfg.loss` (+ reference KL) + lambda * EASE."""
  model = nnx.merge(graphdef, params)
  g = batch.rows_per_prompt
  tokens, mask = batch.tokens, batch.mask
  probe, qvalid, kvalid = None, None, None
  if cfg.ease.enabled:
    keys = row_keys(rng, batch.row_ids)
    probe, qvalid, kvalid = probe_rows(
        model, batch.prompt_ids, batch.ease_target.shape[1], mask, keys, g,
        cfg.ease.num_queries, cfg.ease.layers,
    )  # fmt: skip
  logp, ent, out = rollout.score(
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


RL = Objective(loss=rl_loss, totals=rl_totals)
SFT = Objective(loss=sft_loss, totals=sft_totals)


# ---------------------------------------------------------------------------
# The update step.
# ---------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array


def make_update(
    objective: Objective,
    tx: optax.GradientTransformation,
    graphdef,
    cfg,
    *,
    state_shardings=None,
    frozen: Sequence[str] = (),
):
  """jit(update)(state, batch, rng) -> (state, metrics); donates `state`.

  `batch` leads with a micro-batch axis M ([M, rows, ...] arrays); the
  update scans over it, summing float32 gradients of each micro-batch's
  loss (normalised by `objective.totals` of the whole batch), then applies
  one `tx` update. Metrics: "loss" is the minibatch's loss (the sum over
  micro-batches), the others are means over micro-batches; "grad_norm",
  "param_norm". It lowers from abstract inputs (`jax.ShapeDtypeStruct`s
  with shardings): `make_update(...).lower(state, batch, rng)`.

  `frozen`: path regexes of parameters the optimizer leaves alone (lr
  multiplier 0, e.g. the vision tower): they enter the loss through
  `stop_gradient`, so no backward pass is computed for them at all.
  """
  loss_fn = objective.loss
  if frozen:

    def loss_fn(params, *args):
      held = jax.tree_util.tree_map_with_path(
          lambda path, p: jax.lax.stop_gradient(p)
          if any(re.search(f, sharding_lib.path_str(path)) for f in frozen)
          else p,
          params,
      )
      return objective.loss(held, *args)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(state: TrainState, batch, rng):
    image_token_id = nnx.merge(graphdef, state.params).config.image_token_id
    totals = objective.totals(batch, cfg, image_token_id)
    zeros = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.float32), state.params
    )
    if state_shardings is not None:
      zeros = jax.lax.with_sharding_constraint(zeros, state_shardings.params)

    def micro(carry, mb):
      grads, loss = carry
      (l, m), g = grad_fn(state.params, graphdef, mb, rng, cfg, totals)
      grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      return (grads, loss + l), m

    (grads, loss), ms = jax.lax.scan(micro, (zeros, jnp.float32(0)), batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), dict(ms))
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    return TrainState(params, opt_state, state.step + 1), metrics

  return jax.jit(
      update,
      donate_argnums=0,
      out_shardings=(state_shardings, None) if state_shardings else None,
  )
