"""Host side of one RL iteration: rollouts, rewards, dynamic sampling,
advantages, and minibatches.

  groups = collect(...)        # sample G responses per prompt, in rounds,
                               # keeping groups whose rewards differ (DAPO)
  batch = assemble(groups)     # one fixed-shape batch of B prompts x G rows
  ... analysis pass (steps.analyze) ...
  finalize(batch, analysis)    # rewards (+ attention reward), advantages
  for mb in minibatches(batch): update(...)

`iteration` runs that sequence once; `train.train` calls it every RL step.
Arrays are numpy on the host; `steps` jits the device parts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl import losses
from faithful_rl import metrics as metrics_lib
from faithful_rl import rewards as rewards_lib
from faithful_rl import rollout
from faithful_rl.data import batching

PROMPT_KEYS = ("prompt_ids", "prompt_mask", "position_ids", "vision")
PROMPT_LEVEL = PROMPT_KEYS + (
    "cf_vision",
    "ease_target",
    "focus_target",
    "evidence_mask",
    "has_boxes",
)
ROW_LEVEL = (
    "tokens",
    "mask",
    "old_logp",
    "truncated",
    "lengths",
    "advantages",
    "rewards",
    "token_weights",
    "ref_logp",
)


@dataclasses.dataclass
class Groups:
  """Kept groups: B examples and their B * G sampled rows (host numpy)."""

  examples: list
  tokens: np.ndarray
  logprobs: np.ndarray
  mask: np.ndarray
  truncated: np.ndarray
  lengths: np.ndarray
  rewards: dict[str, np.ndarray]
  correct_cf: np.ndarray | None
  texts: list[str]
  stats: dict[str, float]


def collect(
    model,
    engine: rollout.Engine,
    iterator: batching.BatchIterator,
    processor,
    *,
    num_prompts: int,
    gen_prompts: int,
    sampling: rollout.SamplingConfig,
    reward_kwargs: dict[str, Any],
    dynamic: bool,
    max_rounds: int,
    rng: jax.Array,
    put=lambda x: x,
    cf_rollout: bool = False,
) -> Groups:
  """Samples rounds of `gen_prompts` prompts until `num_prompts` groups.

  With `dynamic`, groups whose G rewards are all equal (zero advantage)
  are set aside and more prompts are drawn, for at most `max_rounds`
  rounds; if still short, set-aside groups fill the batch (counted in
  stats["filled_groups"]). Without it, one round of `num_prompts`.
  With `cf_rollout`, every round is also sampled (same keys) on the
  counterfactual images, for Faithful-MR1's 'rollout_flip' test.
  """
  g = sampling.num_samples
  kept, spare = [], []
  stats = dict(rounds=0, zero_variance_groups=0, sampled_groups=0)
  t_sample = t_reward = 0.0
  generated = 0
  correct_sum = reward_sum = 0.0
  rounds = max_rounds if dynamic else 1
  per_round = gen_prompts if dynamic else num_prompts
  for r in range(rounds):
    if len(kept) >= num_prompts:
      break
    examples = iterator.next_examples(per_round)
    if not examples:
      raise RuntimeError("the training data iterator is exhausted")
    batch = batching.collate(
        examples,
        model_config=model.config,
        buckets=iterator.buckets,
        truncate_response=True,
    )
    prompt = put({k: batch.arrays[k] for k in PROMPT_KEYS})
    key = jax.random.fold_in(rng, r)
    t0 = time.perf_counter()
    ro = jax.device_get(engine.sample(model, prompt, key, sampling))
    correct_cf = None
    if cf_rollout:
      cf_prompt = dict(prompt, vision=put(batch.arrays["cf_vision"]))
      ro_cf = jax.device_get(engine.sample(model, cf_prompt, key, sampling))
    t_sample += time.perf_counter() - t0
    t0 = time.perf_counter()
    n = len(examples)
    tokens, mask = np.asarray(ro.tokens)[: n * g], np.asarray(ro.mask)[: n * g]
    texts = processor.decode_responses(tokens, mask)
    rep = lambda xs: [x for x in xs for _ in range(g)]
    rw = rewards_lib.batch_rewards(
        texts,
        rep(batch.meta["answers"]),
        rep(batch.meta["answer_types"]),
        lengths=mask.sum(-1),
        **reward_kwargs,
    )
    if cf_rollout:
      cf_mask = np.asarray(ro_cf.mask)[: n * g]
      cf_texts = processor.decode_responses(
          np.asarray(ro_cf.tokens)[: n * g], cf_mask
      )
      correct_cf = rewards_lib.batch_rewards(
          cf_texts,
          rep(batch.meta["answers"]),
          rep(batch.meta["answer_types"]),
          boxed_only=reward_kwargs.get("boxed_only", False),
      )["correct"]
    t_reward += time.perf_counter() - t0
    generated += int(mask.sum())
    correct_sum += float(rw["correct"].sum())
    reward_sum += float(rw["reward"].sum())
    zero = losses.zero_variance_groups(rw["reward"], g)
    stats["rounds"] += 1
    stats["sampled_groups"] += n
    stats["zero_variance_groups"] += int(zero.sum())
    for i in range(n):
      rows = slice(i * g, (i + 1) * g)
      group = (
          examples[i],
          tokens[rows],
          np.asarray(ro.logprobs)[rows],
          mask[rows],
          np.asarray(ro.truncated)[rows],
          np.asarray(ro.lengths)[rows],
          {k: v[rows] for k, v in rw.items()},
          None if correct_cf is None else correct_cf[rows],
          texts[rows],
      )
      if dynamic and zero[i]:
        spare.append(group)
      elif len(kept) < num_prompts:
        kept.append(group)
  filled = max(0, num_prompts - len(kept))
  kept += spare[:filled]
  if len(kept) < num_prompts:
    raise RuntimeError(f"only {len(kept)} of {num_prompts} groups collected")
  stats["filled_groups"] = filled
  stats["zero_variance_frac"] = stats["zero_variance_groups"] / max(
      stats["sampled_groups"], 1
  )
  rows_sampled = max(stats["sampled_groups"] * g, 1)
  stats["sampled_accuracy"] = correct_sum / rows_sampled  # before filtering
  stats["sampled_reward"] = reward_sum / rows_sampled
  stats["time/sample"] = t_sample
  stats["time/reward"] = t_reward
  stats["generated_tokens"] = generated
  stats["tokens_per_sec"] = generated / max(t_sample, 1e-9)
  cat = lambda j: np.concatenate([k[j] for k in kept])
  return Groups(
      examples=[k[0] for k in kept],
      tokens=cat(1),
      logprobs=cat(2),
      mask=cat(3),
      truncated=cat(4),
      lengths=cat(5),
      rewards={
          key: np.concatenate([k[6][key] for k in kept]) for key in kept[0][6]
      },
      correct_cf=None if kept[0][7] is None else cat(7),
      texts=[t for k in kept for t in k[8]],
      stats=stats,
  )


def assemble(
    groups: Groups,
    *,
    model_config,
    buckets: batching.Buckets,
    overlong: str = "none",
) -> dict[str, Any]:
  """One fixed-shape training batch (prompt-level and row-level arrays).

  The response axis is cut to the smallest response bucket that holds the
  longest response. With overlong='filter', truncated responses are
  masked out of the loss.
  """
  batch = batching.collate(
      groups.examples,
      model_config=model_config,
      buckets=buckets,
      truncate_response=True,
  )
  arrays = {k: batch.arrays[k] for k in PROMPT_LEVEL}
  longest = int(groups.lengths.max()) if groups.lengths.size else 1
  r = groups.tokens.shape[1]
  fits = [b for b in buckets.response if b >= longest]
  r_cut = min(min(fits) if fits else r, r)
  mask = groups.mask[:, :r_cut].copy()
  if overlong == "filter":
    mask &= ~groups.truncated[:, None]
  arrays.update(
      tokens=groups.tokens[:, :r_cut],
      mask=mask,
      old_logp=groups.logprobs[:, :r_cut],
      truncated=groups.truncated,
      lengths=groups.lengths,
      rewards=groups.rewards["correct"].astype(np.float32),
      token_weights=np.ones_like(groups.logprobs[:, :r_cut]),
  )
  return arrays


def finalize(
    arrays: dict[str, Any],
    groups: Groups,
    analysis: dict[str, np.ndarray],
    *,
    num_samples: int,
    reinforce=None,
    vppo=None,
    std_mode: str = "sample",
    scale: bool = True,
) -> dict[str, float]:
  """Adds the Faithful-MR1 reward, advantages and VPPO weights in place.

  Returns scalar statistics of what was added.
  """
  g = num_samples
  total = groups.rewards["reward"].astype(np.float32).copy()
  correct = groups.rewards["correct"] > 0.5
  stats: dict[str, float] = {}
  if reinforce is not None and reinforce.enabled:
    if reinforce.test == "rollout_flip":
      causal = np.asarray(
          losses.causal_effect(
              correct_orig=correct,
              correct_cf=groups.correct_cf > 0.5,
              test="rollout_flip",
          )
      )
    else:
      causal = np.asarray(
          losses.causal_effect(
              logp_orig=analysis["logp_sum"],
              logp_cf=analysis["logp_cf"],
              test="logprob_drop",
              margin=reinforce.margin,
          )
      )
    bonus = np.where(
        correct & causal,
        reinforce.lambda_attn * np.asarray(analysis["evidence_mass"]),
        0.0,
    ).astype(np.float32)
    total = total + bonus
    stats["mr1/causal_rate"] = float(causal.mean())
    stats["mr1/causal_rate_correct"] = float(
        causal[correct].mean() if correct.any() else 0.0
    )
    stats["mr1/attention_reward"] = float(bonus.mean())
    stats["mr1/evidence_mass"] = float(np.mean(analysis["evidence_mass"]))
  adv = np.asarray(
      losses.grpo_advantages(
          rewards=total, group_size=g, std_mode=std_mode, scale=scale
      )
  )
  if vppo is not None and vppo.enabled:
    dep = np.asarray(analysis["dependency"])
    mask = arrays["mask"]
    arrays["token_weights"] = np.asarray(
        losses.topk_token_mask(scores=dep, mask=mask, frac=vppo.topk),
        np.float32,
    )
    seq = np.asarray(losses.masked_mean(dep, mask, axis=-1))
    mult = np.asarray(
        losses.vppo_advantage_scale(seq_scores=seq, beta_min=vppo.beta_min)
    )
    adv = adv * mult
    stats["vppo/dependency"] = float(seq.mean())
    stats["vppo/multiplier_max"] = float(mult.max())
  arrays["advantages"] = adv.astype(np.float32)
  arrays["total_rewards"] = total
  return stats


def minibatches(arrays: dict[str, Any], *, num_samples: int, num: int, rng):
  """Splits the batch into `num` minibatches of whole groups (shuffled)."""
  b = arrays["prompt_ids"].shape[0]
  if b % num:
    raise ValueError(f"{b} prompts do not split into {num} minibatches")
  order = rng.permutation(b)
  g = num_samples
  for chunk in np.split(order, num):
    rows = (chunk[:, None] * g + np.arange(g)[None]).reshape(-1)
    mb = {}
    for k, v in arrays.items():
      if k == "position_ids":  # [3, B, T]
        mb[k] = v[:, chunk]
      elif k in PROMPT_LEVEL:
        mb[k] = jax.tree.map(lambda x, c=chunk: x[c], v)
      elif k in ROW_LEVEL:
        mb[k] = v[rows]
    yield mb


def iteration(
    config,
    cfg,
    *,
    state,
    graphdef,
    update,
    analyze,
    ref_logprobs,
    ref_holder: list,
    prompts,
    processor,
    engine: rollout.Engine,
    model_config,
    buckets,
    rng,
    put,
    black,
    step: int,
):
  """One RL iteration: collect, assemble, analyse, finalise, update.

  Args:
    config: the run's config; `cfg` its RL stage section (`config.rl`
      with the stage's overrides).
    state, graphdef: the train state and the model's graph.
    update, analyze, ref_logprobs: the jitted device steps
      (`steps.make_update`, `steps.analyze`, the reference log-probs).
    ref_holder: a one-element list holding the frozen reference params
      (set at the first RL step when `kl_beta > 0`).
    prompts: the prompt iterator; processor, engine, model_config,
      buckets: as `collect` and `assemble` take them.
    rng: this step's key; put: host -> device placement; black: the
      counterfactual fill patch; step: the global step (seeds minibatches).

  Returns:
    (new state, float metrics of the step).
  """
  rc = config.rl
  timings = {}
  model = nnx.merge(graphdef, state.params)
  sampling = rollout.SamplingConfig.from_config(
      rc.sampling,
      num_samples=rc.num_samples,
      stop_tokens=(processor.ids.im_end,),
      pad_token=processor.ids.pad,
  )
  reward_kwargs = dict(
      format_weight=rc.format_weight, boxed_only=rc.get("boxed_only", False)
  )
  if rc.overlong == "shaping":
    reward_kwargs.update(
        max_len=sampling.max_new_tokens, cache_len=rc.overlong_cache
    )
  k_roll, k_an, k_up = jax.random.split(rng, 3)
  groups = collect(
      model,
      engine,
      prompts,
      processor,
      num_prompts=rc.num_prompts,
      gen_prompts=rc.gen_prompts,
      sampling=sampling,
      reward_kwargs=reward_kwargs,
      dynamic=rc.dynamic_sampling,
      max_rounds=rc.max_rounds,
      rng=k_roll,
      put=put,
      cf_rollout=cfg.reinforce.enabled and cfg.reinforce.test == "rollout_flip",
  )
  t0 = time.perf_counter()
  arrays = assemble(
      groups, model_config=model_config, buckets=buckets, overlong=rc.overlong
  )
  arrays["black_patch"] = black
  analysis = {}
  if cfg.reinforce.enabled or cfg.vppo.enabled:
    analysis = jax.device_get(
        analyze(state.params, graphdef, put(arrays), k_an, cfg)
    )
  stats = finalize(
      arrays,
      groups,
      analysis,
      num_samples=rc.num_samples,
      reinforce=cfg.reinforce,
      vppo=cfg.vppo,
      std_mode=rc.std_mode,
      scale=rc.scale_advantages,
  )
  if rc.kl_beta > 0:
    if ref_holder[0] is None:  # frozen at the first RL step
      ref_holder[0] = jax.tree.map(jnp.copy, state.params)
    arrays["ref_logp"] = np.asarray(
        ref_logprobs(ref_holder[0], graphdef, put(arrays), cfg)
    )
  timings["time/analysis"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  np_rng = np.random.default_rng([config.seed, step])
  m_all = []
  train_arrays = {k: v for k, v in arrays.items() if k != "total_rewards"}
  for epoch in range(rc.ppo_epochs):
    for mb in minibatches(
        train_arrays,
        num_samples=rc.num_samples,
        num=rc.num_minibatches,
        rng=np_rng,
    ):
      mb["black_patch"] = black
      state, m = update(state, put(mb), jax.random.fold_in(k_up, epoch))
      m_all.append(metrics_lib.scalars(jax.device_get(m)))
  timings["time/update"] = time.perf_counter() - t0
  m = {k: float(np.mean([x[k] for x in m_all])) for k in m_all[0]}
  r = groups.rewards
  m.update(
      reward=float(np.mean(arrays["total_rewards"])),
      accuracy=float(groups.stats["sampled_accuracy"]),
      batch_accuracy=float(r["correct"].mean()),  # kept groups only
      format=float(r["format"].mean()),
      overlong=float(r["overlong"].mean()),
      response_length=float(groups.lengths.mean()),
      truncated=float(groups.truncated.mean()),
      **{k: float(v) for k, v in groups.stats.items()},
      **stats,
      **timings,
  )
  return state, m
