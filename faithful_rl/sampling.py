"""Token selection: temperature, top-k / top-p filtering and the draw.

`next_tokens(row_keys, steps, logits, config)` is where the rollout's
decoding loops (`rollout`, `refill`) choose every token, through
`select_tokens(rng, logits, config)`; its log-probability is that of the
temperature-scaled distribution before filtering, the quantity the
training step recomputes.
Draws are exact inverse-CDF samples (`_categorical`), with one key for the
whole batch or one key per row (so a row's tokens do not depend on which
chunk it was sampled in).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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
    gather_weights: under a mesh, gather the FSDP-sharded weights once per
      call, before decoding (`sharding.gather_fsdp`): each device then
      holds the whole model in the compute dtype, and no decoding step
      all-gathers weights. Costs that copy's memory per device.
  """

  num_samples: int = 1
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_tokens: tuple[int, ...] = ()
  pad_token: int = 0
  gather_weights: bool = False

  @classmethod
  def from_config(cls, cfg, **overrides) -> "SamplingConfig":
    """From an ml_collections block with the same field names."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dict(cfg).items() if k in fields}
    kwargs.update(overrides)
    if "stop_tokens" in kwargs:
      kwargs["stop_tokens"] = tuple(int(t) for t in kwargs["stop_tokens"])
    return cls(**kwargs)


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
    rng: jax.Array,
    logits: jax.Array,
    config: SamplingConfig,
    forced: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row; returns (tokens, log pi(token)).

  The log-probability is that of the temperature-scaled distribution before
  top-k/top-p filtering: the quantity the training step recomputes. `rng`
  is one key, or one key per row (see `_categorical`). `forced`: int32[N],
  a token to take instead of the draw where >= 0 (its log-probability all
  the same).
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
  if forced is not None:
    tokens = jnp.where(forced >= 0, forced, tokens)
  picked = jnp.take_along_axis(scaled, tokens[..., None], -1)[..., 0]
  return tokens, picked - jax.nn.logsumexp(scaled, axis=-1)


def next_tokens(
    row_keys: jax.Array,
    steps,
    logits: jax.Array,
    config: SamplingConfig,
    forced_lengths: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Each row's response token number `steps`: (tokens, log-probs) [N].

  The one place a rollout chooses a token. Row n draws with the key
  fold_in(row_keys[n], steps[n]), so its response depends on its own key
  and logits only: not on the other rows, the slot it decodes in or the
  step of the decoding loop (`faithful_rl.refill`).

  Args:
    row_keys: key[N], one per row (fold_in(rng, row id)).
    steps: int or int32[N], the index of the token in each response.
    logits: float32[N, vocab].
    config: how to sample.
    forced_lengths: int32[N] or None: where > 0, the response is made to
      end at that length: its last token is `config.stop_tokens[0]`
      (benchmarks draw realistic lengths from random weights with it).
  """
  n = logits.shape[0]
  steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), (n,))
  keys = jax.vmap(jax.random.fold_in)(row_keys, steps)
  forced = None
  if forced_lengths is not None:
    if not config.stop_tokens:
      raise ValueError("forced_lengths needs a stop token (stop_tokens)")
    forced = jnp.where(
        (forced_lengths > 0) & (steps == forced_lengths - 1),
        config.stop_tokens[0],
        -1,
    )
  return select_tokens(keys, logits, config, forced)
