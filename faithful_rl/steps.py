"""The jitted update step, the method switches and the objective type.

Everything here maps (params, batch, rng) to numbers; the learners
(`rl.Learner`, `sft.Learner`) own the loops, and each stage's loss lives
beside its learner (`rl.loss.RL`, `sft.SFT`: an `Objective`). Parameters
are a pure dict (`nnx.to_pure_dict`) merged with the model's graphdef
inside the step, so the jit boundary sees plain pytrees. Method switches are frozen
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
forward passes are `faithful_rl.forward`'s; the RL step's no-gradient
passes are in `rl.analysis`.
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
from faithful_rl import sharding as sharding_lib


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


# ---------------------------------------------------------------------------
# The update step.
# ---------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, step=None):
    """A fresh optimizer state over `params`, at `step` (default 0)."""
    step = jnp.zeros((), jnp.int32) if step is None else step
    return cls(params, tx.init(params), step)


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
