"""Host side of a step's rollout: sampling rounds, rewards, dynamic sampling.

  rounds, kept, stats = collect(...)   # rounds of prompts until B groups
  batch = assemble(rounds, kept, ...)  # the step's RolloutBatch, on the mesh

Every process reads its own share of each round's prompts (the iterators
are sharded), samples and rewards its own rows, and all-gathers only the
per-row reward numbers, so that every process takes the same dynamic-
sampling decisions. A round's prompts have a canonical order that does not
depend on the number of processes: process p's i-th prompt is prompt
i * P + p, as its iterator reads every P-th record from p. The rows of
prompt s are sampled with keys derived from s (`rollout` row ids), so one
process and several sample the same responses, and the batch `assemble`
builds (kept groups in canonical order) is the same.

Arrays are numpy on the host; `rollout.Engine` runs the device program, in
calls of `chunk` rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from faithful_rl import losses
from faithful_rl import rewards as rewards_lib
from faithful_rl import rollout
from faithful_rl import sharding
from faithful_rl.data import batching
from faithful_rl.rl.batch import RolloutBatch
from faithful_rl.rl.batch import pad_prompts

# Per-row numbers all-gathered after each round (float32), beside the
# reward terms (`Spec.scores`).
SCORES = ("reward", "correct", "lengths", "truncated")


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a step samples and rewards (built from `config.rl`).

  Attributes:
    sampling: the sampling config (num_samples = G).
    chunk: rows per rollout call, over all processes.
    rewards: the reward terms summed into the reward, by name
      (`rewards.REWARDS`).
    reward_weights: {name: weight} (default 1).
    reward_options: {name: keyword arguments of that term}.
    boxed_only: only a boxed answer earns the correctness reward.
    overlong: 'shaping' | 'filter' | 'none' (docs/methods.md 2).
    overlong_cache: L_cache for the shaping.
    cf_vision: carry the counterfactual images into the batch.
    cf_rollout: also sample on the counterfactual images ('rollout_flip').
  """

  sampling: rollout.SamplingConfig
  chunk: int
  rewards: tuple[str, ...] = ("correct", "format", "overlong")
  reward_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"format": 0.0}
  )
  reward_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=dict
  )
  boxed_only: bool = False
  overlong: str = "none"
  overlong_cache: int = 0
  cf_vision: bool = False
  cf_rollout: bool = False

  def __post_init__(self):
    for name in self.rewards:
      rewards_lib.REWARDS.get(name)  # a clear error for an unknown name

  @property
  def scores(self) -> tuple[str, ...]:
    """The per-row numbers all-gathered after each round."""
    terms = tuple(k for k in self.rewards if k not in SCORES)
    return SCORES + terms


@dataclasses.dataclass
class Round:
  """One generation round: this process's share, and everyone's scores.

  Attributes:
    prompts: collated prompt-level arrays of the local prompts (keys of
      `RolloutBatch.PROMPT_FIELDS` but `group_ids`; position_ids [n, 3, Tp]).
    grids: each local prompt's image grids (to re-pad `prompts`).
    rows: the local rows (n * G): tokens, logprobs, mask, truncated,
      lengths, and the reward terms `Spec.scores` (+ correct_cf).
    scores: `Spec.scores` of every process's rows, in canonical order.
  """

  prompts: dict[str, Any]
  grids: list
  rows: dict[str, np.ndarray]
  scores: dict[str, np.ndarray]

  @property
  def num_local(self) -> int:
    return self.prompts["prompt_ids"].shape[0]


def canonical(x: np.ndarray, procs: int) -> np.ndarray:
  """All-gathered per-prompt data [P * n, ...] (process-major) -> canonical
  order (prompt i * P + p first at position i * P + p)."""
  n = x.shape[0] // procs
  x = x.reshape((procs, n) + x.shape[1:])
  return np.swapaxes(x, 0, 1).reshape((procs * n,) + x.shape[2:])


# ---------------------------------------------------------------------------
# Sampling one round, in chunks.
# ---------------------------------------------------------------------------


def chunk_shape(chunk: int, num_samples: int, procs: int) -> tuple[int, int]:
  """(prompts, rows per prompt) of each process's share of a rollout call."""
  g = num_samples
  if chunk % procs:
    raise ValueError(f"rl.rollout_chunk={chunk} does not split over {procs}"
                     " processes")  # fmt: skip
  u = chunk // procs
  if u >= g:
    if u % g:
      raise ValueError(f"rl.rollout_chunk={chunk}: {u} rows per process is"
                       f" not a multiple of G={g}")  # fmt: skip
    return u // g, g
  if g % u:
    raise ValueError(f"rl.rollout_chunk={chunk}: {u} rows per process does"
                     f" not divide G={g}")  # fmt: skip
  return 1, u


def sample_rows(
    engine: rollout.Engine,
    model,
    prompts: dict[str, Any],
    positions: np.ndarray,
    *,
    rng: jax.Array,
    sampling: rollout.SamplingConfig,
    chunk: int,
    mesh,
    vision: str = "vision",
) -> dict[str, np.ndarray]:
  """G responses for each local prompt, in rollout calls of `chunk` rows.

  Args:
    engine, model: the sampler and the policy.
    prompts: local collated prompt arrays (position_ids [n, 3, Tp]).
    positions: int[n], each prompt's canonical position in the round; row
      j of prompt s samples with row id s * G + j, so the responses do not
      depend on `chunk` or on the number of processes.
    rng: the round's key.
    sampling: num_samples = G.
    chunk: rows per call over all processes.
    mesh: where the calls run.
    vision: the prompts' key of the images to sample on.

  Returns:
    local rows [n * G, R]: tokens, logprobs, mask, truncated, lengths.
  """
  g, r_len = sampling.num_samples, sampling.max_new_tokens
  n = prompts["prompt_ids"].shape[0]
  per_call, rows = chunk_shape(chunk, g, jax.process_count())
  cfg = dataclasses.replace(sampling, num_samples=rows)
  out = dict(
      tokens=np.full((n * g, r_len), sampling.pad_token, np.int32),
      logprobs=np.zeros((n * g, r_len), np.float32),
      mask=np.zeros((n * g, r_len), bool),
      truncated=np.zeros((n * g,), bool),
      lengths=np.zeros((n * g,), np.int32),
  )
  for start in range(0, n, per_call):
    idx = np.minimum(np.arange(start, start + per_call), n - 1)
    real = np.arange(start, start + per_call) < n  # the last call is padded
    for sub in range(0, g, rows):
      offsets = sub + np.arange(rows)
      local = dict(
          prompt_ids=prompts["prompt_ids"][idx],
          prompt_mask=prompts["prompt_mask"][idx],
          position_ids=prompts["position_ids"][idx],
          vision=jax.tree.map(lambda x, i=idx: x[i], prompts[vision]),
          row_ids=(positions[idx, None] * g + offsets).reshape(-1),
      )
      local["row_ids"] = local["row_ids"].astype(np.int32)
      glob = sharding.global_batch(mesh, local)
      batch = dict(glob, position_ids=jnp.swapaxes(glob["position_ids"], 0, 1))
      row_ids = batch.pop("row_ids")
      ro = engine.sample(model, batch, rng, cfg, row_ids=row_ids)
      dest = (idx[real, None] * g + offsets).reshape(-1)
      keep = np.repeat(real, rows)
      for k in out:
        out[k][dest] = sharding.local_rows(getattr(ro, k), mesh)[keep]
  return out


# ---------------------------------------------------------------------------
# Rounds.
# ---------------------------------------------------------------------------


def _agreed_buckets(examples, buckets: batching.Buckets) -> batching.Buckets:
  """One prompt and patch bucket for the round, the same on every process."""
  need = np.asarray(
      [
          max(len(e.prompt_ids) for e in examples),
          max(e.num_patches for e in examples),
      ],
      np.int64,
  )
  need = sharding.allgather(need[None]).max(0)
  return batching.Buckets(
      prompt=(batching.bucket_for(int(need[0]), buckets.prompt, "prompt"),),
      patches=(batching.bucket_for(int(need[1]), buckets.patches, "patches"),),
      response=buckets.response,
  )


def sample_round(
    engine,
    model,
    examples,
    processor,
    *,
    model_config,
    buckets: batching.Buckets,
    spec: Spec,
    rng: jax.Array,
    mesh,
) -> Round:
  """Collates this process's examples once, samples and rewards them."""
  procs, p = jax.process_count(), jax.process_index()
  g = spec.sampling.num_samples
  batch = batching.collate(
      examples,
      model_config=model_config,
      buckets=_agreed_buckets(examples, buckets),
      truncate_response=True,
  )
  a = batch.arrays
  prompts = {k: a[k] for k in RolloutBatch.PROMPT_FIELDS if k in a}
  prompts["position_ids"] = np.swapaxes(a["position_ids"], 0, 1)
  if not spec.cf_vision and not spec.cf_rollout:
    prompts["cf_vision"] = None
  n = len(examples)
  positions = np.arange(n) * procs + p
  sample = lambda vision: sample_rows(
      engine, model, prompts, positions, rng=rng, sampling=spec.sampling,
      chunk=spec.chunk, mesh=mesh, vision=vision,
  )  # fmt: skip
  rows = sample("vision")
  rep = lambda xs: [x for x in xs for _ in range(g)]
  answers, types = rep(batch.meta["answers"]), rep(batch.meta["answer_types"])
  texts = processor.decode_responses(rows["tokens"], rows["mask"])
  responses = rewards_lib.Responses(
      texts, answers, types, np.asarray(rows["lengths"]),
      spec.sampling.max_new_tokens,
  )  # fmt: skip
  rows.update(
      rewards_lib.score_terms(
          responses, spec, spec.rewards, spec.reward_weights,
          spec.reward_options,
      )  # fmt: skip
  )
  if spec.cf_rollout:  # same row ids: the same draws, another image
    cf = sample("cf_vision")
    cf_texts = processor.decode_responses(cf["tokens"], cf["mask"])
    rows["correct_cf"] = rewards_lib.batch_rewards(
        cf_texts, answers, types, boxed_only=spec.boxed_only
    )["correct"]
  keys = spec.scores
  local = np.stack([rows[k].astype(np.float32) for k in keys], axis=1)
  every = sharding.allgather(local.reshape(n, g, len(keys)))
  every = canonical(every, procs).reshape(-1, len(keys))
  scores = {k: every[:, i] for i, k in enumerate(keys)}
  grids = [ex.grids for ex in examples]
  return Round(prompts=prompts, grids=grids, rows=rows, scores=scores)


def collect(
    model,
    engine: rollout.Engine,
    iterator: batching.BatchIterator,
    processor,
    *,
    model_config,
    buckets: batching.Buckets,
    spec: Spec,
    num_prompts: int,
    gen_prompts: int,
    dynamic: bool,
    max_rounds: int,
    rng: jax.Array,
    mesh,
):
  """Samples rounds of `gen_prompts` prompts until `num_prompts` groups.

  With `dynamic`, groups whose G rewards are all equal (zero advantage)
  are set aside (`losses.select_groups` keeps the others, first come) and
  more prompts are drawn, for at most `max_rounds` rounds; if still short,
  set-aside groups fill the batch (stats["filled_groups"]). Without it, one
  round of `num_prompts`. Every process calls this together.

  Returns:
    (rounds, kept, stats): kept lists (round, canonical prompt) pairs, in
    the order of the training batch.
  """
  g = spec.sampling.num_samples
  procs = jax.process_count()
  per_round = gen_prompts if dynamic else num_prompts
  if per_round % procs:
    raise ValueError(
        f"{per_round} prompts per round do not split over {procs} processes"
    )
  rounds: list[Round] = []
  kept: list[tuple[int, int]] = []
  spare: list[tuple[int, int]] = []
  stats = dict(rounds=0, zero_variance_groups=0, sampled_groups=0)
  t_sample = 0.0
  for r in range(max_rounds if dynamic else 1):
    if len(kept) >= num_prompts:
      break
    t0 = time.perf_counter()
    examples = iterator.next_examples(per_round // procs)
    if sharding.any_process(len(examples) < per_round // procs):
      raise RuntimeError("the training data iterator is exhausted")
    rounds.append(
        sample_round(
            engine, model, examples, processor, model_config=model_config,
            buckets=buckets, spec=spec, rng=jax.random.fold_in(rng, r),
            mesh=mesh,
        )  # fmt: skip
    )
    t_sample += time.perf_counter() - t0
    reward = rounds[-1].scores["reward"]
    zero = losses.zero_variance_groups(reward, g)
    stats["rounds"] += 1
    stats["sampled_groups"] += len(zero)
    stats["zero_variance_groups"] += int(zero.sum())
    if dynamic:
      take = losses.select_groups(reward, g, num_prompts - len(kept))
      spare += [(r, int(s)) for s in np.flatnonzero(zero)]
    else:
      take = np.arange(num_prompts)
    kept += [(r, int(s)) for s in take]
  filled = max(0, num_prompts - len(kept))
  kept += spare[:filled]
  if len(kept) < num_prompts:
    raise RuntimeError(f"only {len(kept)} of {num_prompts} groups collected")
  every = {
      k: np.concatenate([rd.scores[k] for rd in rounds]) for k in spec.scores
  }
  stats.update(
      filled_groups=filled,
      zero_variance_frac=stats["zero_variance_groups"]
      / max(stats["sampled_groups"], 1),
      sampled_accuracy=float(every["correct"].mean()),  # before filtering
      sampled_reward=float(every["reward"].mean()),
      generated_tokens=int(every["lengths"].sum()),
  )
  stats["time/sample"] = t_sample
  stats["tokens_per_sec"] = stats["generated_tokens"] / max(t_sample, 1e-9)
  return rounds, kept, stats


# ---------------------------------------------------------------------------
# The training batch.
# ---------------------------------------------------------------------------


def assemble(
    rounds: list[Round],
    kept: list[tuple[int, int]],
    *,
    model_config,
    buckets: batching.Buckets,
    spec: Spec,
    mesh,
) -> tuple[RolloutBatch, dict[str, float]]:
  """The kept groups as one RolloutBatch on the mesh, in `kept` order.

  Rounds with different buckets are re-padded to the largest; the
  response axis is cut to the smallest response bucket that holds the
  longest kept response; with overlong='filter', truncated responses
  leave the loss mask (`losses.overlong_filter_mask`). Advantages and
  token weights are left to `steps.finalize` (zeros and ones here).
  """
  procs = jax.process_count()
  g = spec.sampling.num_samples
  tp = max(rd.prompts["prompt_ids"].shape[1] for rd in rounds)
  patches = max(rd.prompts["vision"].num_patches for rd in rounds)
  prompts = []
  for rd in rounds:
    prompts.append(
        pad_prompts(rd.prompts, rd.grids, prompt_len=tp, patches=patches,
                    model_config=model_config)  # fmt: skip
    )
  # Response axis: the longest kept response, by canonical scores.
  longest = max(
      int(rounds[r].scores["lengths"][s * g : (s + 1) * g].max())
      for r, s in kept
  )
  r_full = spec.sampling.max_new_tokens
  fits = [b for b in buckets.response if b >= max(longest, 1)]
  r_cut = min(min(fits) if fits else r_full, r_full)
  cat = lambda key, f=lambda x: x: jax.tree.map(
      lambda *xs: np.concatenate(xs), *[f(rd.rows[key]) for rd in rounds]
  )
  cut = lambda x: x[:, :r_cut]
  mask = cat("mask", cut)
  truncated = cat("truncated")
  if spec.overlong == "filter":
    mask = np.asarray(
        losses.overlong_filter_mask(truncated=truncated, mask=mask)
    ).astype(bool)
  local_rows = dict(
      tokens=cat("tokens", cut),
      mask=mask,
      old_logp=cat("logprobs", cut),
      rewards=cat("reward"),
      correct=cat("correct"),
      correct_cf=cat("correct_cf") if spec.cf_rollout else None,
      truncated=truncated,
  )
  local_prompts = {
      k: (
          None
          if prompts[0][k] is None
          else jax.tree.map(
              lambda *xs: np.concatenate(xs), *[p[k] for p in prompts]
          )
      )
      for k in prompts[0]
  }
  # Where canonical prompt s of round r sits in the process-major arrays.
  offsets = np.cumsum([0] + [rd.num_local for rd in rounds])
  total_local = int(offsets[-1])
  pidx = np.asarray(
      [(s % procs) * total_local + offsets[r] + s // procs for r, s in kept],
      np.int32,
  )
  ridx = (pidx[:, None] * g + np.arange(g)).reshape(-1).astype(np.int32)
  glob_prompts = sharding.global_batch(mesh, local_prompts)
  glob_rows = sharding.global_batch(mesh, local_rows)
  b = len(kept)

  def build(prompts_, rows_, pidx_, ridx_):
    take = lambda idx: lambda x: jnp.take(x, idx, axis=0)
    p = jax.tree.map(take(pidx_), prompts_)
    rw = jax.tree.map(take(ridx_), rows_)
    n = b * g
    return RolloutBatch(
        **p,
        group_ids=jnp.arange(b, dtype=jnp.int32),
        ref_logp=None,
        token_weights=jnp.ones(rw["tokens"].shape, jnp.float32),
        advantages=jnp.zeros((n,), jnp.float32),
        row_ids=jnp.arange(n, dtype=jnp.int32),
        **rw,
    )

  args = (glob_prompts, glob_rows, pidx, ridx)
  shapes = jax.eval_shape(build, *args)
  out_sh = sharding.batch_sharding(mesh, shapes)
  batch = jax.jit(build, out_shardings=out_sh)(*args)
  # Batch statistics, from the canonical scores of the kept rows.
  sel = lambda key: np.concatenate(
      [rounds[r].scores[key][s * g : (s + 1) * g] for r, s in kept]
  )
  stats = dict(
      batch_accuracy=float(sel("correct").mean()),
      **{k: float(sel(k).mean()) for k in spec.scores[len(SCORES) :]},
      response_length=float(sel("lengths").mean()),
      truncated=float(sel("truncated").mean()),
  )
  return batch, stats
