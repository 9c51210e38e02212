"""Rollout: jitted KV-cache sampling for Qwen-VL.

`sample(model, batch, rng, config)` runs one compiled program per bucket:
vision encoding and prompt prefill once per prompt, the KV cache repeated
for the G samples of each prompt, then a `lax.while_loop` that decodes one
token per step and stops as soon as every sequence has emitted a stop token.

The returned log-probabilities are those of the training forward by
construction: both use this package's one model, the same M-RoPE positions
(a decoded token's position is the prompt's max position + 1 + step, i.e.
HF's rope delta), and the same float32 log-softmax of logits / temperature.
`forward.score` recomputes them teacher-forced, over any image (the
counterfactual branch of Faithful-MR1 and VPPO reuses the sampled tokens
under another image without sampling again).

Batch layout (from `faithful_rl.data.batching`; B prompts):
  prompt_ids int32[B, Tp] (left-padded), prompt_mask [B, Tp],
  position_ids int32[3, B, Tp], vision: VisionInputs or absent.
Outputs are per sample, prompt-major: row b * G + g is sample g of prompt b.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl import sharding
from faithful_rl.sampling import SamplingConfig
from faithful_rl.sampling import next_tokens
from faithful_rl.models.qwen2_5_vl import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollout:
  """Sampled responses, one row per sample (prompt-major).

  Attributes:
    tokens: int32[N, R], pad after the stop token.
    logprobs: float32[N, R], log pi(token) at the sampling temperature.
    mask: bool[N, R], real response tokens (the stop token included).
    truncated: bool[N], no stop token within R tokens.
    lengths: int32[N].
  """

  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  truncated: jax.Array
  lengths: jax.Array


# ---------------------------------------------------------------------------
# The sampling program.
# ---------------------------------------------------------------------------


def repeat(x, g):
  return jax.tree.map(lambda a: jnp.repeat(a, g, axis=0), x)


def _head_logits(model, hidden: jax.Array) -> jax.Array:
  """float32[N, V] logits of hidden [N, D], computed as `score` does.

  Accumulated in float32 and never rounded to the model's dtype (as
  `losses.chunked_token_logprobs`), so sampled log-probabilities equal the
  training forward's in bfloat16 too, on accelerators whose bfloat16
  matmuls round their outputs.
  """
  return jnp.einsum(
      "nd,dv->nv",
      hidden,
      model.head_weight(),
      preferred_element_type=jnp.float32,
  )


def prefill(model, batch: dict, vision, free: int = 0):
  """The prompts into a cache of their slots plus `free` empty ones.

  Returns the prompt forward's output (its cache holds the prompts' keys
  and values; per layer for an unstacked model, as the sampler's), the key
  mask bool[B, Tp + free] (the free slots off) and the M-RoPE position of
  each row's first response token int[B].
  """
  ids, pos = batch["prompt_ids"], batch["position_ids"]
  b, tp = ids.shape
  kv_mask = jnp.concatenate(
      [batch["prompt_mask"].astype(jnp.bool_), jnp.zeros((b, free), bool)], 1
  )
  out = model(
      ids,
      attention_mask=kv_mask,
      position_ids=pos,
      vision=vision,
      cache=KVCache.zeros(
          model.config.text,
          b,
          tp + free,
          model.dtype,
          per_layer=model.language_model.unstacked,
      ),
      cache_index=0,
      return_logits=False,
  )
  return out, kv_mask, pos.max(axis=(0, 2)) + 1


def decoding_model(model, config: SamplingConfig):
  """The model as the decoding loops run it (traced inside their programs).

  The decoder layers unstacked, once, outside the decoding loop: each step
  then reads each layer's weights, and writes and reads its own cache,
  where they lie (a scan over the stack slices, i.e. copies, both per layer
  and step). Weights left FSDP-sharded stay a scan: it gathers one layer's
  weights at a time, where an unrolled step could hold every layer's
  gathered weights at once. One cast of the float32 masters to the compute
  dtype, also outside the loop (bitwise the same forward; see
  `in_compute_dtype`); with `config.gather_weights`, gathered once.
  """
  if config.gather_weights or not sharding.fsdp_sharded():
    model = model.with_layers_unstacked()
  model = model.in_compute_dtype()
  if config.gather_weights:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, sharding.gather_fsdp(state))
  return model


def _sample_program(
    model,
    batch: dict,
    rng: jax.Array,
    config: SamplingConfig,
    row_ids=None,
    forced_lengths=None,
):
  """The whole rollout for one batch (traced once per bucket).

  Row n draws its token at step t with the key fold_in(fold_in(rng,
  row_ids[n]), t): its tokens depend on its prompt, its id and `rng` only,
  not on the other rows of the call, so any split of the rows into calls
  samples the same responses (and `faithful_rl.refill` the same too).
  `forced_lengths`: see `sampling.next_tokens`.

  With G > 1 samples per prompt, the prompts' keys and values are the
  samples' shared prefix: each decoding step reads a prompt's cache once
  for its G rows, and each row keeps only its own R response slots. With
  G = 1 (evaluation) every row decodes into its prompt's cache.
  """
  model = decoding_model(model, config)
  b, tp = batch["prompt_ids"].shape
  g, r = config.num_samples, config.max_new_tokens
  if row_ids is None:
    row_ids = jnp.arange(b * g, dtype=jnp.int32)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)
  n = b * g
  if g == 1:
    out, kv_mask, next_pos = prefill(model, batch, batch.get("vision"), r)
    cache, offset, shared = out.cache, tp, {}
  else:
    out, _, next_pos = prefill(model, batch, batch.get("vision"))
    shared = dict(prefix_cache=out.cache, prefix_mask=batch["prompt_mask"])
    cache = KVCache.zeros(
        model.config.text,
        n,
        r,
        model.dtype,
        per_layer=model.language_model.unstacked,
    )
    kv_mask, offset = jnp.zeros((n, r), jnp.bool_), 0
  last = _head_logits(model, out.hidden[:, -1])  # left-padded: last is real
  last, next_pos = repeat((last, next_pos), g)
  stop = jnp.asarray(config.stop_tokens or (-1,), jnp.int32)

  def choose(step, logits, picked):
    """Each row's token at `step` from its logits, written into `picked`
    (tokens, log-probs, mask, done); rows already done get padding."""
    tokens, logprobs, mask, done = picked
    tok, lp = next_tokens(row_keys, step, logits, config, forced_lengths)
    tok = jnp.where(done, config.pad_token, tok)
    lp = jnp.where(done, 0.0, lp)
    return tok, (
        tokens.at[:, step].set(tok),
        logprobs.at[:, step].set(lp),
        mask.at[:, step].set(~done),
        done | jnp.isin(tok, stop),
    )

  # The first token comes from the prompt's logits; each loop step then
  # runs the forward of the token just chosen and chooses the next, so no
  # forward is computed past the last token (or once every row is done).
  tok, picked = choose(
      0,
      last,
      (
          jnp.full((n, r), config.pad_token, jnp.int32),
          jnp.zeros((n, r), jnp.float32),
          jnp.zeros((n, r), jnp.bool_),
          jnp.zeros((n,), jnp.bool_),
      ),
  )

  def cond(state):
    step, _, picked = state[:3]
    return (step + 1 < r) & ~jnp.all(picked[3])

  def body(state):
    step, tok, picked, cache, kv_mask = state
    kv_mask = kv_mask.at[:, offset + step].set(True)
    step_pos = jnp.broadcast_to((next_pos + step)[None, :, None], (3, n, 1))
    out = model(
        tok[:, None],
        attention_mask=kv_mask,
        position_ids=step_pos,
        cache=cache,
        cache_index=offset + step,
        return_logits=False,
        **shared,
    )
    logits = _head_logits(model, out.hidden[:, 0])
    tok, picked = choose(step + 1, logits, picked)
    return step + 1, tok, picked, out.cache, kv_mask

  final = jax.lax.while_loop(
      cond, body, (jnp.int32(0), tok, picked, cache, kv_mask)
  )
  tokens, logprobs, mask, done = final[2]
  return Rollout(
      tokens=tokens,
      logprobs=logprobs,
      mask=mask,
      truncated=~done,
      lengths=mask.sum(-1).astype(jnp.int32),
  )


# ---------------------------------------------------------------------------
# The engine: one compiled program per bucket.
# ---------------------------------------------------------------------------


def _shape_key(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef,) + tuple(
      (tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)))
      for x in leaves
  )


class Engine:
  """Compiles the sampler once per (model, bucket, sampling config).

  With `refill` (`faithful_rl.refill.Refill`: slots S and window W) it
  samples by slot refill (`refill.sample`: S rows decoded at once in
  windows of W steps, finished slots refilled from the call's queue of
  rows); otherwise each call is one static program (`_sample_program`).
  Both give the same responses for the same keys.

  Attributes:
    compilations: static programs compiled so far (tests read it).
    stats: what the last refilled call ran (`refill.Stats`), or None.
  """

  def __init__(
      self,
      *,
      prompt_buckets: Sequence[int] | None = None,
      patch_buckets: Sequence[int] | None = None,
      refill=None,
  ):
    self.prompt_buckets = tuple(sorted(prompt_buckets or ()))
    self.patch_buckets = tuple(sorted(patch_buckets or ()))
    self.refill = refill
    self._programs: dict[Any, Any] = {}
    self.compilations = 0
    self.stats = None

  def check_bucket(self, batch: dict) -> None:
    tp = batch["prompt_ids"].shape[1]
    if self.prompt_buckets and tp not in self.prompt_buckets:
      raise ValueError(
          f"prompt length {tp} is not a bucket {self.prompt_buckets}; pad"
          " batches with faithful_rl.data.batching"
      )
    vision = batch.get("vision")
    if vision is not None and self.patch_buckets:
      p = vision.pixel_values.shape[1]
      if p not in self.patch_buckets:
        raise ValueError(
            f"patch count {p} is not a bucket {self.patch_buckets}"
        )

  def sample(
      self,
      model,
      batch: dict,
      rng: jax.Array,
      config: SamplingConfig,
      row_ids: jax.Array | None = None,
      forced_lengths: jax.Array | None = None,
  ) -> Rollout:
    """`config.num_samples` responses per prompt of `batch`.

    `row_ids` int32[B * G] names each row's random stream (default
    0..B*G-1; see `_sample_program`): equal ids, prompts and `rng` give
    equal responses in any call. `forced_lengths` int32[B * G]: see
    `sampling.next_tokens` (benchmarks).
    """
    batch = {k: v for k, v in batch.items() if k in _BATCH_KEYS}
    self.check_bucket(batch)
    n = batch["prompt_ids"].shape[0] * config.num_samples
    if row_ids is None:
      row_ids = jnp.arange(n, dtype=jnp.int32)
    if self.refill is not None:
      from faithful_rl import refill as refill_lib  # pylint: disable=g-import-not-at-top

      self.stats = refill_lib.Stats()
      return refill_lib.sample(
          model, batch, rng, config, self.refill, row_ids=row_ids,
          forced_lengths=forced_lengths, stats=self.stats,
      )  # fmt: skip
    graphdef, state = nnx.split(model)
    args = (state, batch, rng, row_ids, forced_lengths)
    key = (graphdef, config, _shape_key(args))
    program = self._programs.get(key)
    if program is None:
      program = self.lower(graphdef, config, *args).compile()
      self._programs[key] = program
      self.compilations += 1
    return program(*args)

  def lower(
      self,
      graphdef,
      config: SamplingConfig,
      state,
      batch,
      rng,
      row_ids,
      forced_lengths=None,
  ):
    """The static rollout program lowered for these (possibly abstract)
    inputs.

    Any of `state`, `batch`, `rng`, `row_ids` may be `jax.ShapeDtypeStruct`s
    (with shardings): `.compile().memory_analysis()` then reports the
    program's memory without allocating anything.
    """

    def fn(state, batch, rng, row_ids, forced_lengths):
      model = nnx.merge(graphdef, state)
      return _sample_program(model, batch, rng, config, row_ids,
                             forced_lengths)  # fmt: skip

    return jax.jit(fn).lower(state, batch, rng, row_ids, forced_lengths)


_BATCH_KEYS = ("prompt_ids", "prompt_mask", "position_ids", "vision")
_DEFAULT_ENGINE = Engine()


def sample(
    model, batch: dict, rng: jax.Array, config: SamplingConfig
) -> Rollout:
  """Samples `config.num_samples` responses per prompt (see module doc)."""
  return _DEFAULT_ENGINE.sample(model, batch, rng, config)


def sample_traced(
    model, batch: dict, rng: jax.Array, config: SamplingConfig, row_ids=None
):
  """`sample` for use inside an enclosing jit (no compile cache)."""
  return _sample_program(model, batch, rng, config, row_ids)
