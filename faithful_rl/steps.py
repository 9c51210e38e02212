"""Pure, jittable training steps: SFT (+ anchoring), RL (+ EASE), analysis.

Everything here maps (params, batch, rng) to numbers; train.py owns the
loop. Parameters are a pure dict (`nnx.to_pure_dict`) merged with the
model's graphdef inside the step, so the jit boundary sees plain pytrees.
Method switches are frozen dataclasses (static under jit), built from the
ml_collections config by `*.from_config`.

RL batch (b prompts x G samples = n rows, prompt-major):
  prompt_ids/prompt_mask/position_ids/vision [b, ...], cf_vision (opt.)
  tokens int32[n, R], mask bool[n, R], old_logp float32[n, R]
  advantages float32[n], rewards float32[n] (correctness, for the gate)
  token_weights float32[n, R] (VPPO filter; ones otherwise)
  ease_target float32[b, V], evidence_mask bool[b, V], has_boxes bool[b]
  ref_logp float32[n, R] (only with a reference KL)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from faithful_rl import losses
from faithful_rl import rollout
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import visual_token_positions


def _from(cls, cfg, **extra):
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in dict(cfg or {}).items() if k in names}
  kwargs.update(extra)
  for k, v in kwargs.items():
    if isinstance(v, list):
      kwargs[k] = tuple(v)
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class EaseConfig:
  """EASE (METHODS 3). layers=() means floor(2L/3)."""

  enabled: bool = False
  weight: float = 0.001
  tau: float = 0.5
  gate: bool = True
  layers: tuple[int, ...] = ()
  num_queries: int = 64
  renormalize: bool = True
  direction: str = "target_to_model"
  no_box: str = "uniform"  # 'uniform' target, or 'skip' the example


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Faithful-MR1 Anchoring (METHODS 4): KL of the <Focus> row."""

  enabled: bool = False
  weight: float = 0.1
  layers: tuple[int, ...] = ()
  renormalize: bool = True
  direction: str = "target_to_model"


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
  """Faithful-MR1 Reinforcing (METHODS 4)."""

  enabled: bool = False
  lambda_attn: float = 0.1
  test: str = "logprob_drop"  # or 'rollout_flip'
  margin: float = 0.0
  layers: tuple[int, ...] = ()
  num_queries: int = 64


@dataclasses.dataclass(frozen=True)
class VppoConfig:
  """VPPO (METHODS 5)."""

  enabled: bool = False
  drop_prob: float = 0.5
  topk: float = 0.4
  beta_min: float = 0.9


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Everything the RL loss and the analysis pass read (static)."""

  num_samples: int = 8
  temperature: float = 1.0
  clip_low: float = 0.2
  clip_high: float = 0.28
  aggregation: str = "token-mean"
  kl_beta: float = 0.0
  ease: EaseConfig = EaseConfig()
  reinforce: ReinforceConfig = ReinforceConfig()
  vppo: VppoConfig = VppoConfig()

  @classmethod
  def from_config(cls, rl) -> "RLConfig":
    return _from(
        cls,
        rl,
        num_samples=rl.num_samples,
        temperature=rl.sampling.temperature,
        ease=_from(EaseConfig, rl.get("ease")),
        reinforce=_from(ReinforceConfig, rl.get("reinforce")),
        vppo=_from(VppoConfig, rl.get("vppo")),
    )


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  anchor: AnchorConfig = AnchorConfig()

  @classmethod
  def from_config(cls, sft) -> "SFTConfig":
    return cls(anchor=_from(AnchorConfig, sft.get("anchor")))


def probe_layers(layers: tuple[int, ...], model) -> tuple[int, ...]:
  return tuple(layers) or (model.config.default_probe_layer,)


def _prompt(batch: dict) -> dict:
  keys = ("prompt_ids", "prompt_mask", "position_ids", "vision")
  return {k: batch[k] for k in keys if k in batch}


def _visual_keys(model, batch: dict, g: int):
  """Visual token positions of each row's prompt: int32[n, V], bool[n, V]."""
  v = batch["ease_target"].shape[1]
  pos, valid = visual_token_positions(
      batch["prompt_ids"], model.config.image_token_id, v
  )
  return jnp.repeat(pos, g, axis=0), jnp.repeat(valid, g, axis=0)


def response_probe(model, batch, mask, rng, g, num_queries, layers):
  """Probe of up to K sampled response rows over the prompt's visual tokens.

  Returns (probe, query_valid bool[n, K], key_valid bool[n, V]).
  """
  qpos, qvalid = losses.sample_query_rows(rng, mask, k=num_queries)
  kpos, kvalid = _visual_keys(model, batch, g)
  probe = AttentionProbe(
      query_positions=qpos,
      key_positions=kpos,
      key_valid=kvalid,
      layers=probe_layers(layers, model),
  )
  return probe, qvalid, kvalid


def _rep(x, g):
  return jnp.repeat(x, g, axis=0)


# ---------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------


def sft_loss(params, graphdef, batch: dict, rng, cfg: SFTConfig):
  """Teacher-forced cross-entropy on reference responses (+ anchoring).

  Token-mean over the batch's response tokens. With anchoring, the probe
  reads the attention row of the first response token (<Focus>) over the
  visual tokens and adds `weight * KL(focus target || row)`.
  """
  del rng
  model = nnx.merge(graphdef, params)
  tokens, mask = batch["response_ids"], batch["response_mask"]
  mask = mask & batch["example_mask"][:, None]
  probe = None
  if cfg.anchor.enabled:
    kpos, kvalid = _visual_keys(model, batch, 1)
    probe = AttentionProbe(
        query_positions=jnp.zeros((tokens.shape[0], 1), jnp.int32),
        key_positions=kpos,
        key_valid=kvalid,
        layers=probe_layers(cfg.anchor.layers, model),
    )
  logp, ent, out = rollout.score(
      model, _prompt(batch), tokens, mask, num_samples=1, probe=probe
  )
  ce = -losses.masked_mean(logp, mask)
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
    )
    total = total + cfg.anchor.weight * anchor
    metrics.update({f"anchor/{k}": v for k, v in m.items()})
    metrics["anchor/loss"] = anchor
  metrics["loss"] = total
  return total, metrics


def rl_loss(params, graphdef, batch: dict, rng, cfg: RLConfig):
  """Clipped policy-gradient loss (+ reference KL) + lambda * EASE."""
  model = nnx.merge(graphdef, params)
  g = cfg.num_samples
  tokens, mask = batch["tokens"], batch["mask"]
  probe, qvalid, kvalid = None, None, None
  if cfg.ease.enabled:
    probe, qvalid, kvalid = response_probe(
        model, batch, mask, rng, g, cfg.ease.num_queries, cfg.ease.layers
    )
  logp, ent, out = rollout.score(
      model,
      _prompt(batch),
      tokens,
      mask,
      num_samples=g,
      temperature=cfg.temperature,
      probe=probe,
  )
  pg, metrics = losses.policy_loss(
      logp=logp,
      old_logp=batch["old_logp"],
      advantages=batch["advantages"],
      mask=mask,
      clip_low=cfg.clip_low,
      clip_high=cfg.clip_high,
      aggregation=cfg.aggregation,
      ref_logp=batch.get("ref_logp"),
      kl_beta=cfg.kl_beta,
      token_weights=batch.get("token_weights"),
  )
  metrics = dict(metrics)
  metrics["entropy"] = losses.masked_mean(ent, mask)
  total = pg
  if cfg.ease.enabled:
    target_mask = None
    if cfg.ease.no_box == "skip":
      target_mask = _rep(batch["has_boxes"], g)
    attn, m = losses.ease_loss(
        attention=out.visual_attention,
        target=_rep(batch["ease_target"], g),
        valid=kvalid,
        rewards=batch["rewards"],
        query_mask=qvalid,
        target_mask=target_mask,
        evidence_mask=_rep(batch["evidence_mask"], g),
        tau=cfg.ease.tau,
        gate=cfg.ease.gate,
        renormalize=cfg.ease.renormalize,
        direction=cfg.ease.direction,
    )
    total = total + cfg.ease.weight * attn
    metrics.update({f"ease/{k}": v for k, v in m.items()})
    metrics["ease/loss"] = attn
  metrics["loss"] = total
  return total, metrics


# ---------------------------------------------------------------------------
# The no-gradient analysis pass of a rollout batch.
# ---------------------------------------------------------------------------


def perturb_patches(
    vision: VisionInputs, rng, *, drop_prob: float, black: jax.Array
) -> VisionInputs:
  """VPPO's perturbed image: each 14-px patch blackened with prob p.

  `black` float[patch_dim] is a black patch after the processor's
  normalisation ((0 - mean) / std per channel).
  """
  pix = vision.pixel_values
  drop = jax.random.bernoulli(rng, drop_prob, pix.shape[:2])
  pix = jnp.where(drop[..., None], black.astype(pix.dtype), pix)
  return dataclasses.replace(vision, pixel_values=pix)


def analyze(params, graphdef, batch: dict, rng, cfg: RLConfig) -> dict:
  """Per-trajectory quantities the rewards and advantages need.

  Returns a dict with, as enabled:
    evidence_mass float32[n]: share of the response's visual attention on
      evidence tokens (Faithful-MR1 reward; also a diagnostic);
    logp_cf float32[n]: summed response log-prob on the counterfactual
      image (the 'logprob_drop' test), beside logp_sum on the original;
    dependency float32[n, R]: VPPO's token visual dependency S.
  """
  model = nnx.merge(graphdef, params)
  g = cfg.num_samples
  tokens, mask = batch["tokens"], batch["mask"]
  out: dict[str, Any] = {}
  r_cfg = cfg.reinforce
  k_probe, k_vppo = jax.random.split(rng)
  if r_cfg.enabled:
    probe, qvalid, kvalid = response_probe(
        model, batch, mask, k_probe, g, r_cfg.num_queries, r_cfg.layers
    )
    logp, _, fwd = rollout.score(
        model,
        _prompt(batch),
        tokens,
        mask,
        num_samples=g,
        temperature=cfg.temperature,
        probe=probe,
    )
    a = losses.trajectory_attention(
        attention=fwd.visual_attention, valid=kvalid, query_mask=qvalid
    )
    ev = _rep(batch["evidence_mask"], g) & kvalid
    out["evidence_mass"] = jnp.sum(jnp.where(ev, a, 0.0), -1)
    out["attention"] = a
    out["logp_sum"] = losses.masked_sum(logp, mask, axis=-1)
    if r_cfg.test == "logprob_drop":
      logp_cf, _, _ = rollout.score(
          model,
          _prompt(batch),
          tokens,
          mask,
          num_samples=g,
          temperature=cfg.temperature,
          vision=batch["cf_vision"],
      )
      out["logp_cf"] = losses.masked_sum(logp_cf, mask, axis=-1)
  if cfg.vppo.enabled:
    perturbed = perturb_patches(
        batch["vision"],
        k_vppo,
        drop_prob=cfg.vppo.drop_prob,
        black=batch["black_patch"],
    )
    logp_p, _, _ = rollout.score(
        model,
        _prompt(batch),
        tokens,
        mask,
        num_samples=g,
        temperature=cfg.temperature,
        vision=perturbed,
    )
    out["dependency"] = losses.visual_dependency(
        logp_perturbed=logp_p, logp_orig=batch["old_logp"], mask=mask
    )
  return out


def reference_logprobs(params, graphdef, batch: dict, cfg: RLConfig):
  """Log-probs of the sampled tokens under frozen reference parameters."""
  model = nnx.merge(graphdef, params)
  logp, _, _ = rollout.score(
      model,
      _prompt(batch),
      batch["tokens"],
      batch["mask"],
      num_samples=cfg.num_samples,
      temperature=cfg.temperature,
  )
  return logp


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
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    graphdef,
    cfg,
    *,
    state_shardings=None,
):
  """jit(update)(state, batch, rng) -> (state, metrics); donates `state`."""

  def update(state: TrainState, batch: dict, rng):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, graphdef, batch, rng, cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    return TrainState(params, opt_state, state.step + 1), metrics

  return jax.jit(
      update,
      donate_argnums=0,
      out_shardings=(state_shardings, None) if state_shardings else None,
  )
