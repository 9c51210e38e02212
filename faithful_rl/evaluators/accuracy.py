"""Held-out evaluation: greedy answers, accuracy, and where the model looks.

For every example of a split (read in order, no shuffling), the policy
answers greedily; the answer is verified against the reference. The same
responses are then scored teacher-forced with the attention probe on up to
K response rows, giving per example the evidence attention mass (share of
visual attention on tokens inside the evidence boxes) and the pointing
game (is the most-attended visual token inside a box), and the KL from
the EASE target to that attention. Metrics are means
over examples (attention metrics over examples that have boxes), overall
and per task family.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl import forward
from faithful_rl import losses
from faithful_rl import rewards as rewards_lib
from faithful_rl import rollout
from faithful_rl import sharding
from faithful_rl.data import batching


class Head:
  """The first n records of a random-access source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
  layers: tuple[int, ...]
  num_queries: int = 64


def _attention_stats(params, graphdef, batch, tokens, mask, spec: ProbeSpec):
  model = nnx.merge(graphdef, params)
  prompt = {
      key: batch[key]
      for key in ("prompt_ids", "prompt_mask", "position_ids", "vision")
  }
  a, kvalid, _ = forward.response_attention(
      model,
      prompt,
      tokens,
      mask,
      jax.random.key(0),
      num_visual=batch["ease_target"].shape[1],
      num_queries=min(spec.num_queries, tokens.shape[1]),
      layers=spec.layers,
  )
  mass, hit = losses.attention_diagnostics(a, batch["evidence_mask"], kvalid)
  kl = losses.attention_kl(
      attention=a, target=batch["ease_target"], valid=kvalid, renormalize=False
  )
  return mass, hit, kl


_attention_stats_jit = jax.jit(_attention_stats, static_argnums=(1, 5))


def evaluate(
    model,
    source,
    processor,
    *,
    engine: rollout.Engine,
    max_new_tokens: int,
    batch_size: int,
    buckets: batching.Buckets,
    num_examples: int | None = None,
    probe_layers: tuple[int, ...] = (),
    mesh=None,
    num_samples_to_show: int = 4,
    boxed_only: bool = False,
    sampled: int = 0,
    temperature: float = 1.0,
    flips: bool = False,
) -> dict[str, Any]:
  """Greedy accuracy and attention diagnostics on `source`.

  With `sampled` = k > 0, each question is also answered k times at
  `temperature` (the policy RL trains), giving "sampled_accuracy", the mean
  over the k answers (avg@k). Greedy and sampled answers go through the
  same check (`rewards.batch_rewards`, with `boxed_only` for both: with it,
  only an answer inside `\\boxed{}` counts, as in the RL reward).

  With `flips`, each question is answered greedily again on its
  counterfactual image (the evidence boxes filled, the processor's
  `counterfactual_fill`), giving "evidence_flip": the share of greedy-correct
  answers (on examples with evidence boxes) that the masked image makes
  wrong. An answer read from the evidence flips; one from the prior stays.

  Returns:
    {"accuracy", "format", "response_length", "evidence_mass",
     "pointing_hit", "attn_kl", "accuracy/<family>", ..., "num_examples"}
    (with "sampled_accuracy", "evidence_flip" as asked) and
    "samples": a few (question, response, answer, correct) for display.
  """
  cfg = model.config
  if num_examples is not None and num_examples < len(source):
    source = Head(source, num_examples)
  it = batching.BatchIterator(
      source,
      processor,
      batch_size=batch_size,
      model_config=cfg,
      buckets=buckets,
      shuffle=False,
      num_epochs=1,
      drop_remainder=False,
      on_overflow="skip",
  )
  sampling = rollout.SamplingConfig(
      num_samples=1,
      max_new_tokens=max_new_tokens,
      greedy=True,
      stop_tokens=(processor.ids.im_end,),
      pad_token=processor.ids.pad,
  )
  check = functools.partial(rewards_lib.batch_rewards, boxed_only=boxed_only)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  stats = collections.defaultdict(list)
  samples = []
  seen = 0
  for batch in it:
    arrays, meta = batch.arrays, batch.meta
    n = len(meta["ids"])
    prompt = {
        k: arrays[k]
        for k in ("prompt_ids", "prompt_mask", "position_ids", "vision")
    }
    if mesh is not None:
      prompt = sharding.put_batch(mesh, prompt)
    ro = engine.sample(model, prompt, jax.random.key(0), sampling)
    tokens = np.asarray(ro.tokens)
    mask = np.asarray(ro.mask)
    texts = processor.decode_responses(tokens[:n], mask[:n])
    rw = check(texts, meta["answers"], meta["answer_types"])
    if sampled:
      sc = dataclasses.replace(
          sampling, greedy=False, num_samples=sampled, temperature=temperature
      )
      ro_s = engine.sample(model, prompt, jax.random.key(1), sc)
      texts_s = processor.decode_responses(
          np.asarray(ro_s.tokens)[: n * sampled],
          np.asarray(ro_s.mask)[: n * sampled],
      )
      rep = lambda xs: [x for x in xs[:n] for _ in range(sampled)]
      rw_s = check(texts_s, rep(meta["answers"]), rep(meta["answer_types"]))
      per_q = rw_s["correct"].reshape(n, sampled).mean(1)
      stats["sampled_accuracy"].extend(per_q.tolist())
    if flips:
      cf = {k: arrays[k] for k in ("prompt_ids", "prompt_mask", "position_ids")}
      cf["vision"] = arrays["cf_vision"]
      if mesh is not None:
        cf = sharding.put_batch(mesh, cf)
      ro_cf = engine.sample(model, cf, jax.random.key(0), sampling)
      texts_cf = processor.decode_responses(
          np.asarray(ro_cf.tokens)[:n], np.asarray(ro_cf.mask)[:n]
      )
      correct_cf = check(texts_cf, meta["answers"], meta["answer_types"])[
          "correct"
      ]
    mass, hit, kl = _attention_stats_jit(
        params,
        graphdef,
        {
            **prompt,
            "evidence_mask": jnp.asarray(arrays["evidence_mask"]),
            "ease_target": jnp.asarray(arrays["ease_target"]),
        },
        jnp.asarray(tokens),
        jnp.asarray(mask),
        ProbeSpec(layers=tuple(probe_layers)),
    )
    mass, hit, kl = np.asarray(mass), np.asarray(hit), np.asarray(kl)
    for i in range(n):
      fam = meta["families"][i] or "all"
      stats["accuracy"].append(rw["correct"][i])
      stats[f"accuracy/{fam}"].append(rw["correct"][i])
      stats["format"].append(rw["format"][i])
      stats["response_length"].append(mask[i].sum())
      stats["truncated"].append(bool(ro.truncated[i]))
      if arrays["has_boxes"][i]:
        stats["evidence_mass"].append(mass[i])
        stats["pointing_hit"].append(hit[i])
        stats["attn_kl"].append(kl[i])  # KL(EASE target || attention)
        stats[f"evidence_mass/{fam}"].append(mass[i])
        if flips and rw["correct"][i]:
          stats["evidence_flip"].append(float(not correct_cf[i]))
      if len(samples) < num_samples_to_show:
        samples.append(
            dict(
                id=meta["ids"][i],
                response=texts[i],
                answer=meta["answers"][i],
                correct=bool(rw["correct"][i]),
            )
        )
    seen += n
  out = {k: float(np.mean(v)) for k, v in stats.items() if v}
  out["num_examples"] = seen
  out["samples"] = samples
  return out
