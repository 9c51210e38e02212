"""One RL step as one object: `Learner.step(state, rng) -> (state, metrics)`.

  rounds, kept = collect(...)       # sample G responses per prompt, in
                                    # rounds, keep groups whose rewards differ
  batch = assemble(rounds, kept)    # one RolloutBatch on the mesh
  batch.old_logp = reference(...)   # rl.old_logp='recompute', in chunks
  batch.ref_logp = reference(...)   # kl_beta > 0, in chunks
  analysis = analyze(...)           # Faithful-MR1 / VPPO, in chunks
  batch = finalize(batch, analysis) # rewards, advantages, VPPO weights
  for minibatch: state = update(state, micro-batches of minibatch)

The learner owns the rollout engine, the jitted device functions and the
frozen reference parameters; `train.py` only calls `step`. Memory is
bounded by three sizes: `rl.rollout_chunk` rows per sampling call,
`rl.analysis_chunk` rows per analysis / reference chunk, `rl.micro_batch`
rows per gradient micro-batch.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl import metrics as metrics_lib
from faithful_rl import optim
from faithful_rl import rollout
from faithful_rl import sharding
from faithful_rl import steps
from faithful_rl.data import batching
from faithful_rl.rl import analysis
from faithful_rl.rl import loss as rl_loss
from faithful_rl.rl import rounds as rounds_lib
from faithful_rl.rl.batch import check_chunk
from faithful_rl.rl.batch import layout
from faithful_rl.rl.batch import unlayout


def black_patch(processor) -> np.ndarray:
  """A black patch after normalisation, float32[patch_dim] (VPPO)."""
  ip = processor.image_processor
  mean = np.asarray(ip.image_mean, np.float32)
  std = np.asarray(ip.image_std, np.float32)
  per_channel = (0.0 - mean) / std
  return np.repeat(per_channel, processor.patch_dim // 3).astype(np.float32)


# Where the update's `old_logp` (the PPO ratio's denominator) comes from:
# the sampler's own log-probs, or the training forward run again over the
# sampled batch before the first update (one forward, no backward).
OLD_LOGP = ("sampler", "recompute")


def check_sizes(rl) -> None:
  """Raises naming the `config.rl` key when the batch sizes or the
  `old_logp` source are not ones the learner can run."""
  g, b = rl.num_samples, rl.num_prompts
  procs = jax.process_count()
  for key in ("rollout_chunk", "analysis_chunk", "micro_batch"):
    check_chunk(int(rl[key]), g, f"rl.{key}")
  if b % rl.num_minibatches:
    raise ValueError(
        f"rl.num_prompts={b} does not split into rl.num_minibatches="
        f"{rl.num_minibatches}"
    )
  for key, rows in (
      ("micro_batch", b // rl.num_minibatches * g),
      ("analysis_chunk", b * g),
  ):
    if rows % rl[key]:
      raise ValueError(
          f"rl.{key}={rl[key]} does not divide the {rows} rows it chunks"
      )
  if rl.old_logp not in OLD_LOGP:
    raise ValueError(
        f"rl.old_logp must be one of {OLD_LOGP}, not {rl.old_logp!r}"
    )
  gen = rl.gen_prompts if rl.dynamic_sampling else b
  if gen % procs or b % procs:
    raise ValueError(
        f"rl.num_prompts={b} and rl.gen_prompts={gen} must split over"
        f" {procs} processes"
    )


def _plain(block) -> dict:
  """A config block (ConfigDict, dict or None) as a plain dict."""
  if block is None:
    return {}
  return block.to_dict() if hasattr(block, "to_dict") else dict(block)


class Learner:
  """The RL stage's step (see the module docstring).

  Args:
    config: the run's config (`config.rl` is read).
    graphdef: the model's graph; parameters come with each state.
    tx: the optimizer.
    mesh: the device mesh.
    processor: decodes responses (and gives the image normalisation).
    model_config: the model's config.
    buckets: the batch buckets.
    prompts: this process's share of the training prompts (a
      `batching.BatchIterator` sharded by process).
    state_shardings: the train state's shardings (the update keeps them).
    engine: a `rollout.Engine` (default: a new one over the buckets).
    saved: what `saved()` returned at the checkpoint resumed from ({"ref":
      the frozen reference parameters}), or None at the stage's start.
  """

  def __init__(
      self,
      config,
      *,
      graphdef,
      tx,
      mesh,
      processor,
      model_config,
      buckets: batching.Buckets,
      prompts,
      state_shardings=None,
      engine: rollout.Engine | None = None,
      saved: dict | None = None,
  ):
    rc = config.rl
    check_sizes(rc)
    self.rc, self.cfg = rc, steps.RLConfig.from_config(rc)
    self.graphdef, self.mesh, self.processor = graphdef, mesh, processor
    self.model_config, self.buckets, self.prompts = (
        model_config,
        buckets,
        prompts,
    )
    self.engine = engine or rollout.Engine(
        prompt_buckets=buckets.prompt, patch_buckets=buckets.patches
    )
    reinforce = self.cfg.reinforce
    self.spec = rounds_lib.Spec(
        sampling=rollout.SamplingConfig.from_config(
            rc.sampling,
            num_samples=rc.num_samples,
            stop_tokens=(processor.ids.im_end,),
            pad_token=processor.ids.pad,
        ),
        chunk=int(rc.rollout_chunk),
        rewards=tuple(rc.rewards),
        reward_weights=_plain(rc.get("reward_weights")),
        reward_options=_plain(rc.get("reward_options")),
        boxed_only=bool(rc.boxed_only),
        overlong=rc.overlong,
        overlong_cache=int(rc.overlong_cache),
        cf_vision=reinforce.enabled and reinforce.test == "logprob_drop",
        cf_rollout=reinforce.enabled and reinforce.test == "rollout_flip",
    )
    self.update = steps.make_update(
        rl_loss.RL,
        tx,
        graphdef,
        self.cfg,
        state_shardings=state_shardings,
        frozen=optim.frozen_patterns(rc.optim),
    )
    self._analyze = jax.jit(analysis.analyze_chunks, static_argnums=(1, 4))
    self._reference = jax.jit(analysis.reference_chunks, static_argnums=(1, 3))
    self._finalize = jax.jit(analysis.finalize, static_argnums=(2,))
    self._gap = jax.jit(analysis.logp_gap)
    self.black = sharding.replicated(mesh, black_patch(processor))
    # Frozen at the stage's first step (kl_beta > 0), kept by checkpoints.
    self.ref_params = (saved or {}).get("ref")

  def saved(self) -> dict:
    """What a checkpoint keeps of the learner beyond the train state."""
    return {} if self.ref_params is None else {"ref": self.ref_params}

  @property
  def needs_reference(self) -> bool:
    return self.cfg.kl_beta > 0

  def step(self, state: steps.TrainState, rng) -> tuple[Any, dict]:
    """One RL iteration; every process calls it with the same `rng`."""
    rc, cfg = self.rc, self.cfg
    k_roll, k_an, k_up, k_perm = jax.random.split(rng, 4)
    model = nnx.merge(self.graphdef, state.params)
    rounds, kept, stats = rounds_lib.collect(
        model,
        self.engine,
        self.prompts,
        self.processor,
        model_config=self.model_config,
        buckets=self.buckets,
        spec=self.spec,
        num_prompts=rc.num_prompts,
        gen_prompts=rc.gen_prompts,
        dynamic=rc.dynamic_sampling,
        max_rounds=rc.max_rounds,
        rng=k_roll,
        mesh=self.mesh,
    )
    t0 = time.perf_counter()
    batch, batch_stats = rounds_lib.assemble(
        rounds,
        kept,
        model_config=self.model_config,
        buckets=self.buckets,
        spec=self.spec,
        mesh=self.mesh,
    )
    del rounds
    n = batch.tokens.shape[0]
    # One chunk layout serves every no-gradient pass of the step.
    recompute = rc.old_logp == "recompute"
    run_analysis = cfg.reinforce.enabled or cfg.vppo.enabled
    chunks = None
    if recompute or self.needs_reference or run_analysis:
      everything = np.arange(rc.num_prompts)
      chunks = layout(batch, everything, rc.analysis_chunk, self.mesh)
    gap = {}
    if recompute:
      own = self._reference(state.params, self.graphdef, chunks, cfg)
      recomputed = unlayout(own, n)
      gap = self._gap(batch.old_logp, recomputed, batch.mask)
      # The passes below (VPPO's dependency) read the recomputed ones too.
      batch.old_logp, chunks.old_logp = recomputed, own
    if self.needs_reference:
      if self.ref_params is None:
        self.ref_params = jax.tree.map(jnp.copy, state.params)
      ref = self._reference(self.ref_params, self.graphdef, chunks, cfg)
      batch.ref_logp = unlayout(ref, n)
    passes = {}
    if run_analysis:
      out = self._analyze(
          state.params, self.graphdef, chunks, k_an, cfg, self.black
      )
      passes = unlayout(out, n)
    batch, fin_stats = self._finalize(batch, passes, cfg)
    t_analysis = time.perf_counter() - t0
    t0 = time.perf_counter()
    perm = np.random.default_rng(np.asarray(jax.random.key_data(k_perm)))
    per_update = []
    for epoch in range(rc.ppo_epochs):
      order = perm.permutation(rc.num_prompts)
      for mb in np.split(order, rc.num_minibatches):
        micro = layout(batch, mb, rc.micro_batch, self.mesh)
        state, m = self.update(state, micro, jax.random.fold_in(k_up, epoch))
        per_update.append(metrics_lib.scalars(jax.device_get(m)))
    out = {k: float(np.mean([x[k] for x in per_update])) for k in per_update[0]}
    out.update(
        reward=float(jnp.mean(batch.rewards)),
        accuracy=stats.pop("sampled_accuracy"),
        **batch_stats,
        **{k: float(v) for k, v in stats.items()},
        **metrics_lib.scalars(jax.device_get(fin_stats)),
        **metrics_lib.scalars(jax.device_get(gap)),
    )
    out["time/analysis"] = t_analysis
    out["time/update"] = time.perf_counter() - t0
    return state, out
