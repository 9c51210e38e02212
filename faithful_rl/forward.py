"""The forward passes every stage scores responses with.

  score(model, batch, tokens, mask, num_samples=G, probe=...)
      teacher-forced log-probs, entropies and (with a probe) attention rows
      of sampled or reference responses: the update's forward (RL and SFT),
      the old-log-prob and reference passes, the analysis passes.
  probe_rows(model, prompt_ids, num_visual, mask, rng, g, num_queries, layers)
      an `AttentionProbe` of K sampled response rows over the visual tokens.
  response_attention(model, batch, tokens, mask, rng, ...)
      probe -> score -> the response's visual attention distribution (the
      Faithful-MR1 reward, the evaluator's diagnostics, inference.answer).

Batch layout: see `faithful_rl.rollout` (the prompt batch the responses
were sampled from); responses are prompt-major, row b * G + g is sample g
of prompt b.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from faithful_rl import losses
from faithful_rl import rollout
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import visual_token_positions

# ---------------------------------------------------------------------------
# Teacher-forced scoring (the training forward).
# ---------------------------------------------------------------------------


def response_inputs(
    batch: dict, tokens: jax.Array, mask: jax.Array, g: int, image_token_id: int
):
  """Prompt (repeated G times) + response as one sequence.

  Returns:
    dict(input_ids [N, Tp+R], attention_mask, image_mask (the prompt's image
    tokens only), position_ids [3, N, Tp+R], vision (repeated),
    response_start = Tp).
  """
  ids = jnp.repeat(batch["prompt_ids"], g, axis=0)
  pmask = jnp.repeat(batch["prompt_mask"], g, axis=0).astype(jnp.bool_)
  pos = jnp.repeat(batch["position_ids"], g, axis=1)
  r = tokens.shape[1]
  next_pos = pos.max(axis=(0, 2)) + 1
  rpos = next_pos[:, None] + jnp.arange(r, dtype=pos.dtype)[None]
  is_img = ids == image_token_id
  return dict(
      input_ids=jnp.concatenate([ids, tokens.astype(ids.dtype)], 1),
      image_mask=jnp.concatenate([is_img, jnp.zeros(tokens.shape, bool)], 1),
      attention_mask=jnp.concatenate([pmask, mask.astype(jnp.bool_)], 1),
      position_ids=jnp.concatenate(
          [pos, jnp.broadcast_to(rpos[None], (3,) + rpos.shape)], 2
      ),
      vision=None
      if batch.get("vision") is None
      else rollout.repeat(batch["vision"], g),
      response_start=ids.shape[1],
  )


def score(
    model,
    batch: dict,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    num_samples: int,
    temperature: float = 1.0,
    vision: Any = "same",
    probe: AttentionProbe | None = None,
    chunk: int = 128,
    shared_prefix: bool | None = None,
):
  """Teacher-forced log-probs of responses: the training forward.

  With `shared_prefix` (default when num_samples > 1) the prompt, image
  included, is encoded once per prompt into a KV cache, which is repeated
  for its G responses; the responses then run over it. This is the same
  computation as the full [prompt + response] forward (equal to float
  rounding, gradients included: they flow into the prompt through the
  cache) with G times fewer prompt tokens. Otherwise every row runs
  prompt + response in one sequence.

  Args:
    model: the policy.
    batch: the prompt batch the responses were sampled from.
    tokens: int32[N, R] responses (N = B * num_samples).
    mask: bool[N, R] real response tokens.
    num_samples: G.
    temperature: divides the logits (use the sampling temperature).
    vision: "same" (the batch's images), None (no images), or another
      `VisionInputs` for the B prompts (e.g. the counterfactual images).
    probe: an attention probe whose query positions index the response
      (0 = first response token) and whose key positions index the prompt
      + response sequence (e.g. the prompt's visual tokens).
    chunk: positions per log-softmax chunk (never [N, T, V] at once).
    shared_prefix: see above; None picks it when num_samples > 1.

  Returns:
    (logprobs float32[N, R], entropy float32[N, R], model output; in
    shared-prefix mode the output is the responses' forward).
  """
  g = num_samples
  if shared_prefix is None:
    shared_prefix = g > 1
  vis = batch.get("vision") if vision == "same" else vision
  r = tokens.shape[1]
  if shared_prefix:
    hidden, out = _shared_prefix_forward(model, batch, vis, tokens, mask, g,
                                         probe)  # fmt: skip
  else:
    seq = response_inputs(batch, tokens, mask, g, model.config.image_token_id)
    seq["vision"] = None if vis is None else rollout.repeat(vis, g)
    start = seq["response_start"]
    if probe is not None:
      probe = dataclasses.replace(
          probe, query_positions=probe.query_positions + start
      )
    out = model(
        seq["input_ids"],
        attention_mask=seq["attention_mask"],
        position_ids=seq["position_ids"],
        image_mask=seq["image_mask"],
        vision=seq["vision"],
        attention_probe=probe,
        return_logits=False,
    )
    hidden = out.hidden[:, start - 1 : start - 1 + r]  # predicts tokens
  logp, ent = losses.chunked_token_logprobs(
      hidden,
      model.head_weight(),
      tokens,
      chunk=min(chunk, r),
      temperature=temperature,
  )
  return logp, ent, out


def _shared_prefix_forward(model, batch, vision, tokens, mask, g, probe):
  """Prompt once into a cache, the shared prefix of its G responses.

  Returns hidden states [N, R, D] predicting `tokens` and the responses'
  model output.
  """
  b, _ = batch["prompt_ids"].shape
  r = tokens.shape[1]
  prompt, _, next_pos = rollout.prefill(model, batch, vision)
  rpos = next_pos[:, None] + jnp.arange(r, dtype=next_pos.dtype)[None]
  rpos = jnp.broadcast_to(
      rollout.repeat(rpos, g)[None], (3, b * g, r)
  )  # [3, N, R]
  out = model(
      tokens,
      attention_mask=mask.astype(jnp.bool_),
      position_ids=rpos,
      prefix_cache=prompt.cache,
      prefix_mask=batch["prompt_mask"],
      attention_probe=probe,
      return_logits=False,
  )
  last = jnp.repeat(prompt.hidden[:, -1:], g, axis=0)  # predicts token 0
  hidden = jnp.concatenate([last, out.hidden[:, :-1]], axis=1)
  return hidden, out


# ---------------------------------------------------------------------------
# Attention probes over the visual tokens.
# ---------------------------------------------------------------------------


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
  kpos, kvalid = rollout.repeat((kpos, kvalid), g)
  probe = AttentionProbe(
      query_positions=qpos,
      key_positions=kpos,
      key_valid=kvalid,
      layers=probe_layers(layers, model),
  )
  return probe, qvalid, kvalid


def row_keys(rng, row_ids):
  """One key per row: fold_in(rng, row_id) (chunking never changes it)."""
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)


def response_attention(
    model,
    batch: dict,
    tokens: jax.Array,
    mask: jax.Array,
    rng,
    *,
    num_visual: int,
    num_samples: int = 1,
    num_queries: int,
    layers: tuple[int, ...],
    temperature: float = 1.0,
):
  """Each response's visual attention distribution, averaged over K rows.

  Probes K response rows sampled with `rng` (one key, or one per row),
  scores the responses and averages the probed rows
  (`losses.trajectory_attention`).

  Returns:
    (attention float32[N, V], key_valid bool[N, V], logprobs float32[N, R]).
  """
  probe, qvalid, kvalid = probe_rows(
      model, batch["prompt_ids"], num_visual, mask, rng, num_samples,
      num_queries, layers,
  )  # fmt: skip
  logp, _, out = score(
      model,
      batch,
      tokens,
      mask,
      num_samples=num_samples,
      temperature=temperature,
      probe=probe,
  )
  a = losses.trajectory_attention(
      attention=out.visual_attention, valid=kvalid, query_mask=qvalid
  )
  return a, kvalid, logp
