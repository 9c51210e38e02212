"""The Qwen decoder shared by the Qwen-VL families, and what it returns.

Qwen2.5-VL's decoder (Qwen2: biased q/k/v, chunked M-RoPE) and Qwen3-VL's
(Qwen3: no biases, per-head q/k RMSNorm before RoPE, an explicit head_dim,
interleaved M-RoPE) differ only by `TextConfig` switches, so both are this
one `DecoderLayer`, stacked with a leading [L] axis (`layers.stacked`).

Also here: the attention probe (`AttentionProbe`, `probe_attention`): for
chosen layers, the attention of chosen query rows over chosen key columns
(the visual tokens), computed from that layer's own q and k after RoPE
with the same mask, as a thin [B, H, Q, S] product; the KV cache
(`KVCache`, stacked or per layer); and the forward's output
(`ModelOutput`).

Axis alphabet: B batch, T query positions, S key positions (= T without a
cache, = cache length with one), L layers, H heads, K kv heads, d head dim,
D width, V visual tokens, Q probed rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import attention as attention_lib
from faithful_rl.models import layers
from faithful_rl.models.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionProbe:
  """Which attention rows and columns to return.

  Attributes:
    query_positions: int32[B, Q], query rows (indices into the T inputs).
    key_positions: int32[B, V], key columns (indices into the S keys),
      usually the visual tokens (see `visual_token_positions`).
    key_valid: bool[B, V], columns that exist (padding columns read 0).
    layers: decoder layers to probe (static).
    per_head: return [B, H, Q, V] instead of the head mean [B, Q, V].
  """

  query_positions: jax.Array
  key_positions: jax.Array
  key_valid: jax.Array
  layers: tuple[int, ...] = dataclasses.field(
      default=(), metadata=dict(static=True)
  )
  per_head: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer, in one of two layouts.

  Stacked: one dtype[L, B, K, S, d] array per tensor, what the scanned
  decoder reads and writes. Per layer: tuples of L arrays dtype[B, K, S, d],
  what the sampler's decoding loop carries. There each layer writes its new
  keys into its own array and attends over it where it lies; a scanned
  stack would slice, i.e. copy, every layer's cache out at every step.
  Heads before slots, so that a decoding step's two attention products read
  a layer's cache as it lies.

  A hybrid decoder's linear-attention layers (`linear`, per layer only)
  keep their state instead: k[i] is the convolution state [B, W - 1, C]
  (dtype) and v[i] the recurrent state float32[B, Hv, dk, dv].
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  linear: tuple[int, ...] = dataclasses.field(
      default=(), metadata=dict(static=True)
  )

  @classmethod
  def zeros(
      cls,
      cfg: TextConfig,
      batch: int,
      length: int,
      dtype,
      per_layer: bool = False,
  ):
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    n = cfg.num_hidden_layers
    linear = cfg.linear_layers
    if linear and not per_layer:
      raise ValueError(
          "a decoder with linear-attention layers caches per layer"
      )
    if per_layer:
      k, v = [], []
      for i in range(n):
        if i in linear:
          conv, rec = cfg.linear_state_shapes(batch)
          k.append(jnp.zeros(conv, dtype))
          v.append(jnp.zeros(rec, jnp.float32))
        else:
          k.append(jnp.zeros(shape, dtype))
          v.append(jnp.zeros(shape, dtype))
      return cls(k=tuple(k), v=tuple(v), linear=linear)
    return cls(k=jnp.zeros((n, *shape), dtype), v=jnp.zeros((n, *shape), dtype))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def length(self) -> int:
    if not self.per_layer:
      return self.k.shape[3]
    full = next(i for i in range(len(self.k)) if i not in self.linear)
    return self.k[full].shape[2]

  @property
  def rows(self) -> int:
    return self.k[0].shape[0] if self.per_layer else self.k.shape[1]

  def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
    """Layer i's (k, v), [B, K, S, d] each (a linear layer's state)."""
    return self.k[i], self.v[i]

  def with_layers(self, k, v) -> "KVCache":
    """The same kind of cache holding per-layer tuples `k`, `v`."""
    return dataclasses.replace(self, k=tuple(k), v=tuple(v))

  def repeat(self, g: int) -> "KVCache":
    """Each sequence's cache g times in a row (the G samples of a prompt)."""
    axis = 0 if self.per_layer else 1
    rep = lambda a: jnp.repeat(a, g, axis=axis)
    return dataclasses.replace(
        self, k=jax.tree.map(rep, self.k), v=jax.tree.map(rep, self.v)
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
  """What a forward returns.

  Attributes:
    logits: float32[B, T, vocab] or None (when `return_logits=False`).
    hidden: [B, T, D], final normalised hidden states (the head's input).
    visual_attention: {layer: float32[B, Q, V] or [B, H, Q, V]}: probed
      attention probabilities (softmax over all keys, not renormalised).
    cache: the updated KVCache, or None.
  """

  logits: jax.Array | None
  hidden: jax.Array
  visual_attention: dict[int, jax.Array]
  cache: KVCache | None


def visual_token_positions(
    input_ids: jax.Array, image_token_id: int, num_tokens: int
) -> tuple[jax.Array, jax.Array]:
  """Positions of the first `num_tokens` image tokens of each row.

  Returns:
    positions: int32[B, num_tokens] (0 where there are fewer tokens).
    valid: bool[B, num_tokens].
  """
  is_img = input_ids == image_token_id
  pos = jax.vmap(
      lambda row: jnp.nonzero(row, size=num_tokens, fill_value=0)[0]
  )(is_img)
  count = is_img.sum(-1, keepdims=True)
  valid = jnp.arange(num_tokens)[None] < count
  return pos.astype(jnp.int32), valid


def _group_rows(x: jax.Array, b: int) -> jax.Array:
  """[N, ...] -> [b, N / b, ...]: the rows of each prefix group."""
  return x.reshape((b, x.shape[0] // b) + x.shape[1:])


def probe_attention(
    q: jax.Array,
    k: jax.Array,
    key_mask: jax.Array,
    query_slots: jax.Array,
    probe: AttentionProbe,
    scale: float,
    prefix: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
  """The probed attention rows of one layer.

  Args:
    q: [B, T, H, d] queries after RoPE.
    k: [B, K, S, d] keys after RoPE.
    key_mask: bool[B, S], keys that exist.
    query_slots: int32[B, T], key slot of each query (causal bound).
    probe: which rows and columns; with a prefix, key positions index the
      concatenation [prefix (Tp) | own keys (S)].
    scale: logit scale.
    prefix: (keys [b, K, Tp, d], mask bool[b, Tp]) shared by the B / b
      consecutive rows of each group, all visible to every query.

  Returns:
    float32[B, H, Q, V] probabilities (softmax over all keys).
  """
  b, _, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  qpos = probe.query_positions
  q_sel = jnp.take_along_axis(q, qpos[:, :, None, None], axis=1)  # [B,Q,H,d]
  slot = jnp.take_along_axis(query_slots, qpos, axis=1)  # [B, Q]
  qg = q_sel.reshape(b, -1, kh, h // kh, d)
  logits = jnp.einsum(
      "bqkgd,bksd->bkgqs", qg, k, preferred_element_type=jnp.float32
  ).reshape(b, h, -1, s)
  s_idx = jnp.arange(s)
  allowed = key_mask[:, None, :] & (s_idx[None, None, :] <= slot[:, :, None])
  if prefix is not None:
    pk, pmask = prefix
    nb = pk.shape[0]
    pre = jnp.einsum(
        "brqkgd,bksd->brkgqs",
        _group_rows(qg, nb),
        pk,
        preferred_element_type=jnp.float32,
    ).reshape(b, h, -1, pk.shape[2])
    logits = jnp.concatenate([pre, logits], axis=-1)
    pre_ok = jnp.broadcast_to(
        jnp.repeat(pmask, b // nb, axis=0)[:, None, :],
        (b, allowed.shape[1], pk.shape[2]),
    )
    allowed = jnp.concatenate([pre_ok, allowed], axis=-1)
  logits = jnp.where(
      allowed[:, None], logits * scale, jnp.finfo(jnp.float32).min
  )
  probs = jax.nn.softmax(logits, axis=-1)
  cols = jnp.take_along_axis(
      probs, probe.key_positions[:, None, None, :], axis=-1
  )
  return cols * probe.key_valid[:, None, None, :]


def write_at(
    buf: jax.Array, new: jax.Array, index, axis: int, row_axis: int = 0
) -> jax.Array:
  """`new` written into `buf` (same rank) from `index` on along `axis`.

  `index` is one slot for every row (a Python int or a traced scalar), or
  int32[B], one per row along `row_axis`: the slots of a refilled sampler
  decode at different steps (`faithful_rl.refill`).
  """
  if jnp.ndim(index) == 0:
    at = [0] * buf.ndim
    at[axis] = index
    return jax.lax.dynamic_update_slice(buf, new, at)
  inner = axis - (row_axis < axis)
  one = lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x, i, inner)
  return jax.vmap(one, (row_axis, row_axis, 0), row_axis)(buf, new, index)


def read_at(x: jax.Array, index, size: int, axis: int) -> jax.Array:
  """`size` entries of `x` [B, ...] from `index` on along `axis`; `index`
  as in `write_at` (one for all rows, or int32[B] one per row)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_slice_in_dim(x, index, size, axis)
  one = lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, size, axis - 1)
  return jax.vmap(one)(x, index)


@dataclasses.dataclass
class Context:
  """Per-forward values every decoder layer reads.

  The attention mask is `attention.attend`'s: key j is visible to query i
  iff both are real tokens (segment 1; padding is segment 0, and padding
  queries see only padding) and slot j <= slot i. With a prefix, every
  query also sees every real prefix key of its group.
  """

  key_mask: jax.Array  # bool[B, S]
  query_slots: jax.Array  # int32[B, T]
  cache_index: Any  # int (static) or a traced scalar
  probe: AttentionProbe | None
  impl: str = "auto"
  prefix_mask: jax.Array | None = None  # bool[b, Tp]
  # Per-layer caches: each layer writes its new keys into its own cache
  # first, then attends over the whole cache (see `Attention.__call__`).
  write_cache: bool = False

  @property
  def static_index(self) -> bool:
    return isinstance(self.cache_index, (int, np.integer))


class Attention(nnx.Module):
  """Grouped-query self-attention with M-RoPE.

  Qwen2: biased q/k/v. Qwen3 (`cfg.qk_norm`): RMSNorm over each head's q
  and k (weights [d]) before RoPE, biases as `attention_bias` says.
  """

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = hd
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv = dict(bias=cfg.qkv_bias, **kw)
    self.q_proj = layers.linear(d, self.num_heads * hd, **qkv)
    self.k_proj = layers.linear(d, self.num_kv_heads * hd, **qkv)
    self.v_proj = layers.linear(d, self.num_kv_heads * hd, **qkv)
    self.o_proj = layers.linear(self.num_heads * hd, d, bias=cfg.o_bias, **kw)
    if cfg.qk_norm:
      norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
      self.q_norm = layers.RMSNorm(hd, **norm)
      self.k_norm = layers.RMSNorm(hd, **norm)
    else:
      self.q_norm = self.k_norm = None

  def qk(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """Queries [B, T, H, d] and keys [B, T, K, d] after RoPE."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)

  def queries_keys(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """(queries, keys, output gate [B, T, H * d] or None): `qk` plus the
    gate a gated attention (Qwen3.5's) multiplies its output by."""
    return (*self.qk(x, cos, sin), None)

  def __call__(self, x, cos, sin, ctx: Context, layer_cache, prefix=None):
    """Returns (output [B, T, D], keys/values, probe [B, H, Q, V] or None).

    The keys/values are the T new ones [B, K, T, d] (in the cache's dtype),
    for the caller to write; with `ctx.write_cache`, this layer's whole
    cache [B, K, S, d] with the new ones written at `ctx.cache_index`.

    `layer_cache`: this layer's (k, v) cache [B, K, S, d] or None;
    `prefix`: this layer's shared prefix (k, v) [b, K, Tp, d] or None.
    """
    b, t, _ = x.shape
    q, k, gate = self.queries_keys(x, cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, d]
    written = layer_cache is not None and ctx.write_cache
    at = lambda c, x: write_at(c, x, ctx.cache_index, axis=2)
    if layer_cache is not None:
      k = k.astype(layer_cache[0].dtype)
      v = v.astype(layer_cache[1].dtype)
    if written:
      layer_cache = (at(layer_cache[0], k), at(layer_cache[1], v))
    out = self._attend(q, (k, v), layer_cache, ctx, prefix)
    probe = None
    if ctx.probe is not None:
      keys = k
      if written:
        keys = layer_cache[0]
      elif layer_cache is not None:
        keys = at(layer_cache[0], k)
      probe = probe_attention(
          q, keys, ctx.key_mask, ctx.query_slots, ctx.probe,
          self.head_dim**-0.5,
          None if prefix is None else (prefix[0], ctx.prefix_mask),
      )  # fmt: skip
    out = out.reshape(b, t, -1)
    if gate is not None:
      out = out * jax.nn.sigmoid(gate)
    out = self.o_proj(out)
    return out, layer_cache if written else (k, v), probe

  def _attend(self, q, new_kv, layer_cache, ctx: Context, prefix):
    """Attention over the prefix (if any), the cached keys (if any) and the
    T new keys, merged by log-sum-exp when there is more than one part.

    A stacked cache is only read: the new keys are attended on their own
    rather than written into a copy of the layer's cache (the layer returns
    them; `decode` writes all layers' new keys into the stacked cache
    once). With `ctx.write_cache` the layer's own cache already holds them
    (and is read whole, the new keys included).
    """
    b, t = q.shape[:2]
    k, v = new_kv
    scale = self.head_dim**-0.5
    slots = ctx.query_slots
    key_mask = ctx.key_mask
    fresh = layer_cache is None or (ctx.static_index and ctx.cache_index == 0)
    parts = []
    if not fresh:  # decoding: the cached keys (before the new ones)
      ck, cv = layer_cache
      s = ck.shape[2]
      slot = jnp.arange(s, dtype=jnp.int32)
      cached = key_mask
      if not ctx.write_cache:
        first = jnp.reshape(ctx.cache_index, (-1, 1))  # [1 or B, 1]
        new = (slot[None] >= first) & (slot[None] < first + t)
        cached = key_mask & ~new
      parts.append(
          attention_lib.attend(
              q, ck, cv,
              q_seg=jnp.ones((b, t), jnp.int32),
              kv_seg=cached.astype(jnp.int32),
              q_pos=slots,
              kv_pos=jnp.broadcast_to(slot[None], (b, s)),
              scale=scale,
              impl="xla",  # one query row per sequence: nothing to fuse
              return_lse=not ctx.write_cache or prefix is not None,
          )
      )  # fmt: skip
    if fresh or not ctx.write_cache:
      # The T new keys (all of them, without a cache or in a fresh one).
      new_mask = read_at(key_mask, ctx.cache_index, t, axis=1)
      new_seg = new_mask.astype(jnp.int32)
      parts.append(
          attention_lib.attend(
              q, k, v,
              q_seg=new_seg,
              kv_seg=new_seg,
              q_pos=slots,
              kv_pos=slots,
              scale=scale,
              impl=ctx.impl if fresh else "xla",
              return_lse=bool(parts) or prefix is not None,
              causal_offset=0 if fresh else None,
          )
      )  # fmt: skip
    if prefix is not None:
      # The group's shared prefix, once per group: its G rows' queries are
      # stacked as the rows of one longer query block.
      pk, pv = prefix
      nb = pk.shape[0]
      rows = q.reshape(nb, (b // nb) * t, q.shape[2], q.shape[3])
      out, lse = attention_lib.attend(
          rows,
          pk,
          pv,
          q_seg=jnp.ones(rows.shape[:2], jnp.int32),
          kv_seg=ctx.prefix_mask.astype(jnp.int32),
          scale=scale,
          impl=ctx.impl if ctx.static_index else "xla",
          return_lse=True,
      )
      parts.append((out.reshape(q.shape), lse.reshape(q.shape[:3])))
    if len(parts) == 1:
      return parts[0]
    return attention_lib.merge(parts)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, rngs=rngs, **kw)
    self.mlp = layers.GatedMLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        bias=False,
        rngs=rngs,
        **kw,
    )
    eps = cfg.rms_norm_eps
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=eps, **kw)
    self.post_attention_layernorm = layers.RMSNorm(
        cfg.hidden_size, eps=eps, **kw
    )

  def __call__(self, x, cos, sin, ctx, layer_cache, prefix=None):
    h, kv, probe = self.self_attn(
        self.input_layernorm(x), cos, sin, ctx, layer_cache, prefix
    )
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv, probe


class TextModel(nnx.Module):
  """Token embedding, the stacked decoder layers and the final norm."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )
    self.layers = layers.stacked(
        cfg.num_hidden_layers,
        lambda r: DecoderLayer(
            cfg, dtype=dtype, param_dtype=param_dtype, rngs=r
        ),
        rngs,
    )
    self.norm = layers.RMSNorm(
        cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
        param_dtype=param_dtype,
    )  # fmt: skip

  @property
  def unstacked(self) -> bool:
    """Whether the layers are L separate modules (`unstack`)."""
    return isinstance(self.layers, nnx.List)

  def layer(self, i: int) -> DecoderLayer:
    """Decoder layer i as its own module (a view of the stacked weights)."""
    if self.unstacked:
      return self.layers[i]
    return layers.layer_slice(self.layers, i)

  def unstack(self) -> None:
    """Replaces the stacked layers by L modules, each holding its slice.

    For a copy made inside a jitted function (see
    `VisionLanguageModel.with_layers_unstacked`): the slices are taken once,
    and a loop that runs the layers many times reads each layer's weights
    where they lie.
    """
    if not self.unstacked:
      n = self.cfg.num_hidden_layers
      self.layers = nnx.List(self.layer(i) for i in range(n))
