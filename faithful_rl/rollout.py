"""Rollout: jitted KV-cache sampling for Qwen-VL, and teacher-forced scoring.

`sample(model, batch, rng, config)` runs one compiled program per bucket:
vision encoding and prompt prefill once per prompt, the KV cache repeated
for the G samples of each prompt, then a `lax.while_loop` that decodes one
token per step and stops as soon as every sequence has emitted a stop token.

The returned log-probabilities are those of the training forward by
construction: both use this package's one model, the same M-RoPE positions
(a decoded token's position is the prompt's max position + 1 + step, i.e.
HF's rope delta), and the same float32 log-softmax of logits / temperature.
`score` recomputes them teacher-forced, over any image (the counterfactual
branch of Faithful-MR1 and VPPO reuses the sampled tokens under another
image without sampling again).

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

from faithful_rl import losses
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample (hashable: part of the compile-cache key).

  Attributes:
    num_samples: G, responses per prompt.
    max_new_tokens: R, the response length bucket.
    temperature: logits are divided by it (ignored when greedy).
    top_k: keep the k most likely tokens (0: off).
    top_p: keep the smallest set with cumulative probability >= p (1: off).
    greedy: argmax decoding.
    stop_tokens: ids that end a response (included in it).
    pad_token: written after a response has ended.
  """

  num_samples: int = 1
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_tokens: tuple[int, ...] = ()
  pad_token: int = 0

  @classmethod
  def from_config(cls, cfg, **overrides) -> "SamplingConfig":
    """From an ml_collections block with the same field names."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dict(cfg).items() if k in fields}
    kwargs.update(overrides)
    if "stop_tokens" in kwargs:
      kwargs["stop_tokens"] = tuple(int(t) for t in kwargs["stop_tokens"])
    return cls(**kwargs)


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
# Token selection.
# ---------------------------------------------------------------------------


def filter_logits(scaled: jax.Array, *, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / top-p set to finfo.min (k first, as HF).

  top-p keeps every token whose strictly more likely tokens hold less than
  `top_p` of the (top-k renormalised) mass: the smallest top set of mass
  >= top_p. Ties at either threshold are kept, so a set may exceed k or the
  smallest set by exact ties.
  """
  neg = jnp.finfo(scaled.dtype).min
  if top_k and top_k < scaled.shape[-1]:
    # The k-th value as the minimum of the top k: XLA:CPU turns the slice
    # `top_k(...)[0][..., -1:]` into a full sort (~100x slower at 32k).
    kth = jax.lax.top_k(scaled, top_k)[0].min(-1, keepdims=True)
    scaled = jnp.where(scaled < kth, neg, scaled)
  if top_p < 1.0:
    threshold = _top_p_threshold(scaled, top_p)
    scaled = jnp.where(scaled < threshold, neg, scaled)
  return scaled


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys that sort as the float32 values x do."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _from_order_key(key: jax.Array) -> jax.Array:
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32((1 << 31) - 1), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _top_p_threshold(scaled: jax.Array, top_p: float) -> jax.Array:
  """Per row, the smallest logit whose strictly larger logits hold < top_p.

  A bisection over the 2^32 float32 values (32 masked sums over the
  vocabulary) instead of a sort: XLA:CPU sorts a 32k vocabulary in ~45 ms,
  ~20x slower than this, in every decoding step. The mass above a value
  only changes at the row's logits, so the result is one of them.
  """
  probs = jax.nn.softmax(scaled, axis=-1)
  keys = _order_key(scaled)

  def body(_, bounds):
    lo, hi = bounds  # the answer's key is in [lo, hi]
    mid = lo + (hi - lo) // 2
    above = jnp.where(scaled > _from_order_key(mid), probs, 0.0)
    ok = above.sum(-1, keepdims=True) < top_p
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  bounds = (keys.min(-1, keepdims=True), keys.max(-1, keepdims=True))
  _, hi = jax.lax.fori_loop(0, 32, body, bounds)
  return _from_order_key(hi)


def _argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)` (first maximum) as two plain reductions.

  XLA:CPU runs argmax's (value, index) reduction unvectorised: ~5x slower
  at a 32k vocabulary.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == top, idx, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1)


def _last_positive(x: jax.Array) -> jax.Array:
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.max(jnp.where(x > 0, idx, 0), axis=-1)


def per_row_keys(rng: jax.Array) -> bool:
  """Whether `rng` is one typed PRNG key per row (key[N]) or one key."""
  return bool(
      jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim > 0
  )


def _categorical(rng: jax.Array, logits: jax.Array, block: int = 128):
  """One draw per row from softmax(logits) by a two-level inverse CDF.

  A block of `block` tokens is drawn by its mass, then a token within it:
  two uniforms and short cumulative sums per row. `jax.random.categorical`
  (Gumbel-max) draws V Gumbel variables per row: ~25x slower on CPU at a
  32k vocabulary. Tokens (and blocks) of zero mass are never drawn. With
  one key per row (key[N] for logits [N, V]), a row's draw depends on its
  own key only.
  """
  shape, v = logits.shape[:-1], logits.shape[-1]
  nb = -(-v // block)
  e = jnp.exp(logits - logits.max(-1, keepdims=True)).reshape(-1, v)
  e = jnp.pad(e, ((0, 0), (0, nb * block - v))).reshape(-1, nb, block)
  if per_row_keys(rng):
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(rng.reshape(-1))
    u = u.T[:, :, None]
  else:
    u = jax.random.uniform(rng, (2, e.shape[0], 1))

  def draw(weights, u):
    cum = jnp.cumsum(weights, axis=-1)
    i = jnp.sum(cum <= u * cum[:, -1:], axis=-1)
    return jnp.minimum(i, _last_positive(weights))  # u * total == total

  b = draw(e.sum(-1), u[0])
  i = draw(jnp.take_along_axis(e, b[:, None, None], axis=1)[:, 0], u[1])
  return (b * block + i).reshape(shape)


def select_tokens(
    rng: jax.Array, logits: jax.Array, config: SamplingConfig
) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns (tokens, log pi(token)).

  The log-probability is that of the temperature-scaled distribution before
  top-k/top-p filtering: the quantity the training step recomputes. `rng`
  is one key, or one key per row (see `_categorical`).
  """
  logits = logits.astype(jnp.float32)
  temp = 1.0 if config.greedy else config.temperature
  scaled = logits / temp
  if config.greedy:
    tokens = _argmax(scaled)
  else:
    filtered = filter_logits(scaled, top_k=config.top_k, top_p=config.top_p)
    tokens = _categorical(rng, filtered)
  tokens = tokens.astype(jnp.int32)
  picked = jnp.take_along_axis(scaled, tokens[..., None], -1)[..., 0]
  return tokens, picked - jax.nn.logsumexp(scaled, axis=-1)


# ---------------------------------------------------------------------------
# The sampling program.
# ---------------------------------------------------------------------------


def _repeat(x, g):
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


def _prefill(model, batch: dict, vision, free: int = 0):
  """The prompts into a cache of their slots plus `free` empty ones.

  Returns the prompt forward's output (its cache holds the prompts' keys
  and values), the key mask bool[B, Tp + free] (the free slots off) and the
  M-RoPE position of each row's first response token int[B].
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
      cache=KVCache.zeros(model.config.text, b, tp + free, model.dtype),
      cache_index=0,
      return_logits=False,
  )
  return out, kv_mask, pos.max(axis=(0, 2)) + 1


def _sample_program(
    model, batch: dict, rng: jax.Array, config: SamplingConfig, row_ids=None
):
  """The whole rollout for one batch (traced once per bucket).

  Row n draws its token at step t with the key fold_in(fold_in(rng,
  row_ids[n]), t): its tokens depend on its prompt, its id and `rng` only,
  not on the other rows of the call, so any split of the rows into calls
  samples the same responses.

  With G > 1 samples per prompt, the prompts' keys and values are the
  samples' shared prefix: each decoding step reads a prompt's cache once
  for its G rows, and each row keeps only its own R response slots. With
  G = 1 (evaluation) every row decodes into its prompt's cache.
  """
  b, tp = batch["prompt_ids"].shape
  g, r = config.num_samples, config.max_new_tokens
  if row_ids is None:
    row_ids = jnp.arange(b * g, dtype=jnp.int32)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)
  n = b * g
  if g == 1:
    out, kv_mask, next_pos = _prefill(model, batch, batch.get("vision"), r)
    cache, offset, shared = out.cache, tp, {}
  else:
    out, _, next_pos = _prefill(model, batch, batch.get("vision"))
    shared = dict(prefix_cache=out.cache, prefix_mask=batch["prompt_mask"])
    cache = KVCache.zeros(model.config.text, n, r, model.dtype)
    kv_mask, offset = jnp.zeros((n, r), jnp.bool_), 0
  last = _head_logits(model, out.hidden[:, -1])  # left-padded: last is real
  last, next_pos = _repeat((last, next_pos), g)
  stop = jnp.asarray(config.stop_tokens or (-1,), jnp.int32)

  def cond(state):
    step, done = state[0], state[4]
    return (step < r) & ~jnp.all(done)

  def body(state):
    step, tokens, logprobs, mask, done, cache, kv_mask, logits = state
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    tok, lp = select_tokens(keys, logits, config)
    tok = jnp.where(done, config.pad_token, tok)
    lp = jnp.where(done, 0.0, lp)
    tokens = tokens.at[:, step].set(tok)
    logprobs = logprobs.at[:, step].set(lp)
    mask = mask.at[:, step].set(~done)
    done = done | jnp.isin(tok, stop)
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
    return (step + 1, tokens, logprobs, mask, done, out.cache, kv_mask,
            logits)  # fmt: skip

  init = (
      jnp.int32(0),
      jnp.full((n, r), config.pad_token, jnp.int32),
      jnp.zeros((n, r), jnp.float32),
      jnp.zeros((n, r), jnp.bool_),
      jnp.zeros((n,), jnp.bool_),
      cache,
      kv_mask,
      last,
  )
  final = jax.lax.while_loop(cond, body, init)
  tokens, logprobs, mask, done = final[1], final[2], final[3], final[4]
  return Rollout(
      tokens=tokens,
      logprobs=logprobs,
      mask=mask,
      truncated=~done,
      lengths=mask.sum(-1).astype(jnp.int32),
  )


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
      else _repeat(batch["vision"], g),
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
    seq["vision"] = None if vis is None else _repeat(vis, g)
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
  prompt, _, next_pos = _prefill(model, batch, vision)
  rpos = next_pos[:, None] + jnp.arange(r, dtype=next_pos.dtype)[None]
  rpos = jnp.broadcast_to(_repeat(rpos, g)[None], (3, b * g, r))  # [3, N, R]
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
# The engine: one compiled program per bucket.
# ---------------------------------------------------------------------------


def _shape_key(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef,) + tuple(
      (tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None)))
      for x in leaves
  )


class Engine:
  """Compiles `sample` once per (model, bucket, sampling config).

  Attributes:
    compilations: how many programs were compiled so far (tests read it).
  """

  def __init__(
      self,
      *,
      prompt_buckets: Sequence[int] | None = None,
      patch_buckets: Sequence[int] | None = None,
  ):
    self.prompt_buckets = tuple(sorted(prompt_buckets or ()))
    self.patch_buckets = tuple(sorted(patch_buckets or ()))
    self._programs: dict[Any, Any] = {}
    self.compilations = 0

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
  ) -> Rollout:
    """`config.num_samples` responses per prompt of `batch`.

    `row_ids` int32[B * G] names each row's random stream (default
    0..B*G-1; see `_sample_program`): equal ids, prompts and `rng` give
    equal responses in any call.
    """
    batch = {k: v for k, v in batch.items() if k in _BATCH_KEYS}
    self.check_bucket(batch)
    graphdef, state = nnx.split(model)
    if row_ids is None:
      n = batch["prompt_ids"].shape[0] * config.num_samples
      row_ids = jnp.arange(n, dtype=jnp.int32)
    args = (state, batch, rng, row_ids)
    key = (graphdef, config, _shape_key(args))
    program = self._programs.get(key)
    if program is None:
      program = self.lower(graphdef, config, *args).compile()
      self._programs[key] = program
      self.compilations += 1
    return program(*args)

  def lower(self, graphdef, config: SamplingConfig, state, batch, rng, row_ids):
    """The rollout program lowered for these (possibly abstract) inputs.

    Any of `state`, `batch`, `rng`, `row_ids` may be `jax.ShapeDtypeStruct`s
    (with shardings): `.compile().memory_analysis()` then reports the
    program's memory without allocating anything.
    """

    def fn(state, batch, rng, row_ids):
      model = nnx.merge(graphdef, state)
      return _sample_program(model, batch, rng, config, row_ids)

    return jax.jit(fn).lower(state, batch, rng, row_ids)


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
