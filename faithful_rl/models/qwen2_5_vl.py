"""Qwen2.5-VL in Flax NNX: vision tower + Qwen2 decoder with M-RoPE.

One forward serves training, rollout and evaluation:

* training / evaluation: `model(input_ids, attention_mask=..., vision=...,
  position_ids=..., attention_probe=...)` over whole sequences;
* rollout: the same call with a `KVCache`: the T new tokens are written at
  slots `cache_index .. cache_index + T - 1` and attend to every valid slot
  up to their own (prefill is T = prompt length, decoding T = 1).

At scale: the decoder layers are ONE layer module whose parameters carry a
leading [L] axis, run as a `lax.scan` (`scan_layers`, the default) so the
program and its compile time do not grow with depth, each layer
rematerialised by the `remat` policy in the backward pass. Parameters are
stored in `param_dtype` (float32 masters for training) and computed in
`dtype` (bf16 on accelerators). The main attention never forms a
[B, T, S] mask or score tensor outside the `xla` implementation: masks are
segment ids and positions (`attention.attend`).

The attention probe (`AttentionProbe`) returns, for chosen decoder layers,
the attention of chosen query rows over chosen key columns (the visual
tokens), computed from that layer's own q and k after RoPE with the same
mask, as a thin [B, H, Q, S] product. Probed layers run outside the scan,
so only they pay for it; no [B, H, T, T] tensor is ever returned.

Axis alphabet: B batch, T query positions, S key positions (= T without a
cache, = cache length with one), L layers, H heads, K kv heads, d head dim,
D width, V vocab or visual tokens (named where used), Q probed rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import attention as attention_lib
from faithful_rl.models import inputs as inputs_lib
from faithful_rl.models import layers
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.models.vision import VisionTower


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
  """Keys and values of every layer, dtype[L, B, K, S, d] each.

  One stacked array per tensor, the layout the scanned decoder carries;
  heads before slots, so that a decoding step's two attention products read
  a layer's cache as it lies.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype):
    shape = (
        cfg.num_hidden_layers,
        batch,
        cfg.num_key_value_heads,
        length,
        cfg.head_dim,
    )
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def length(self) -> int:
    return self.k.shape[3]

  def repeat(self, g: int) -> "KVCache":
    """Each sequence's cache g times in a row (the G samples of a prompt)."""
    return KVCache(
        k=jnp.repeat(self.k, g, axis=1), v=jnp.repeat(self.v, g, axis=1)
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


@dataclasses.dataclass
class _Context:
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

  @property
  def static_index(self) -> bool:
    return isinstance(self.cache_index, (int, np.integer))


class Attention(nnx.Module):
  """Grouped-query self-attention with biased q/k/v and M-RoPE."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = hd
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.linear(d, self.num_heads * hd, bias=True, **kw)
    self.k_proj = layers.linear(d, self.num_kv_heads * hd, bias=True, **kw)
    self.v_proj = layers.linear(d, self.num_kv_heads * hd, bias=True, **kw)
    self.o_proj = layers.linear(self.num_heads * hd, d, bias=False, **kw)

  def __call__(self, x, cos, sin, ctx: _Context, layer_cache, prefix=None):
    """Returns (output [B, T, D], the T new keys/values [B, K, T, d] (in
    the cache's dtype), probe [B, H, Q, V] or None).

    `layer_cache`: this layer's (k, v) cache [B, K, S, d] or None;
    `prefix`: this layer's shared prefix (k, v) [b, K, Tp, d] or None.
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, d]
    if layer_cache is not None:
      k = k.astype(layer_cache[0].dtype)
      v = v.astype(layer_cache[1].dtype)
    out = self._attend(q, (k, v), layer_cache, ctx, prefix)
    probe = None
    if ctx.probe is not None:
      keys = k
      if layer_cache is not None:
        at = (0, 0, ctx.cache_index, 0)
        keys = jax.lax.dynamic_update_slice(layer_cache[0], k, at)
      probe = probe_attention(
          q, keys, ctx.key_mask, ctx.query_slots, ctx.probe,
          self.head_dim**-0.5,
          None if prefix is None else (prefix[0], ctx.prefix_mask),
      )  # fmt: skip
    return self.o_proj(out.reshape(b, t, -1)), (k, v), probe

  def _attend(self, q, new_kv, layer_cache, ctx: _Context, prefix):
    """Attention over the prefix (if any), the cached keys (if any) and the
    T new keys, merged by log-sum-exp when there is more than one part.

    The cache is only read: the new keys are attended on their own rather
    than written into a copy of the layer's cache (the layer returns them;
    `decode` writes all layers' new keys into the stacked cache once).
    """
    b, t = q.shape[:2]
    k, v = new_kv
    scale = self.head_dim**-0.5
    slots = ctx.query_slots
    key_mask = ctx.key_mask
    fresh = layer_cache is None or (ctx.static_index and ctx.cache_index == 0)
    parts = []
    if not fresh:  # decoding: the cached keys before the new ones
      ck, cv = layer_cache
      s = ck.shape[2]
      slot = jnp.arange(s, dtype=jnp.int32)
      new = (slot >= ctx.cache_index) & (slot < ctx.cache_index + t)
      parts.append(
          attention_lib.attend(
              q, ck, cv,
              q_seg=jnp.ones((b, t), jnp.int32),
              kv_seg=(key_mask & ~new[None]).astype(jnp.int32),
              q_pos=slots,
              kv_pos=jnp.broadcast_to(slot[None], (b, s)),
              scale=scale,
              impl="xla",  # one query row per sequence: nothing to fuse
              return_lse=True,
          )
      )  # fmt: skip
    # The T new keys (all of them, without a cache or in a fresh one).
    new_mask = jax.lax.dynamic_slice_in_dim(key_mask, ctx.cache_index, t, 1)
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

  def layer(self, i: int) -> DecoderLayer:
    """Decoder layer i as its own module (a view of the stacked weights)."""
    return layers.layer_slice(self.layers, i)


class Qwen2_5_VL(nnx.Module):  # pylint: disable=invalid-name
  """Qwen2.5-VL for conditional generation.

  Args:
    config: the architecture.
    dtype: compute dtype (activations, matmul inputs, the KV cache).
    param_dtype: storage dtype of the parameters (default `dtype`); train
      with float32 here and bf16 compute.
    remat: what each layer keeps for the backward pass: 'none', 'full'
      (only its input) or 'dots' (its matmul outputs); see
      `layers.REMAT_POLICIES`.
    attention: the main attention's implementation, 'auto' (XLA on CPU,
      splash on TPU, the blocked 'flash' kernel elsewhere), 'xla', 'flash'
      or 'splash' (see `attention`).
    scan_layers: run the layers as one `lax.scan` (False: a Python loop over
      the same stacked parameters, the unrolled reference).
    rngs: initialisation randomness.
  """

  def __init__(
      self,
      config: ModelConfig,
      *,
      dtype=jnp.float32,
      param_dtype=None,
      remat: str = "none",
      attention: str = "auto",
      scan_layers: bool = True,
      rngs: nnx.Rngs,
  ):
    layers.remat_policy(remat)
    attention_lib.resolve(attention)
    param_dtype = param_dtype or dtype
    self.config = config
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.remat = remat
    self.attention = attention
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.visual = VisionTower(
        config.vision, remat=remat, attention=attention,
        scan_layers=scan_layers, **kw,
    )  # fmt: skip
    self.language_model = TextModel(config.text, **kw)
    if not config.text.tie_word_embeddings:
      self.lm_head = layers.linear(
          config.text.hidden_size, config.text.vocab_size, bias=False, **kw
      )

  # -------------------------------------------------------------------
  # Pieces, usable on their own.
  # -------------------------------------------------------------------

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.language_model.embed_tokens(input_ids)

  def encode_images(self, vision: VisionInputs) -> jax.Array:
    """Merged visual tokens in image order: [B, V, D]."""
    return self.visual(vision)

  def scatter_images(
      self,
      embeds: jax.Array,
      input_ids: jax.Array,
      image_embeds: jax.Array,
      image_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Puts the k-th visual token of row b at row b's k-th image token.

    `image_mask` bool[B, T] names the positions that receive visual tokens
    (default: every `<|image_pad|>`); responses pass the prompt's, so an
    image token the policy happens to sample stays a plain token.
    """
    is_img = input_ids == self.config.image_token_id
    if image_mask is not None:
      is_img = image_mask.astype(jnp.bool_)
    idx = jnp.clip(jnp.cumsum(is_img, axis=-1) - 1, 0, None)
    gathered = jnp.take_along_axis(image_embeds, idx[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered.astype(embeds.dtype), embeds)

  def head_weight(self) -> jax.Array:
    """The output projection as [D, vocab], in the compute dtype."""
    if self.config.text.tie_word_embeddings:
      w = self.language_model.embed_tokens.embedding[...].T
    else:
      w = self.lm_head.kernel[...]
    return w.astype(self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32[..., vocab] from final hidden states."""
    w = self.head_weight().astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w).astype(jnp.float32)

  # -------------------------------------------------------------------
  # Forward.
  # -------------------------------------------------------------------

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      vision: VisionInputs | None = None,
      pixel_values: Any = None,
      image_grid_thw: Any = None,
      image_embeds: jax.Array | None = None,
      inputs_embeds: jax.Array | None = None,
      image_mask: jax.Array | None = None,
      attention_probe: AttentionProbe | None = None,
      cache: KVCache | None = None,
      cache_index: Any = 0,
      prefix_cache: KVCache | None = None,
      prefix_mask: jax.Array | None = None,
      return_logits: bool = True,
  ) -> ModelOutput:
    """Runs the model.

    Args:
      input_ids: int32[B, T].
      attention_mask: int/bool[B, S], 1 for real tokens; with a cache it
        covers all S cache slots (the new tokens included). None: all real.
      position_ids: int32[3, B, T] M-RoPE positions (see
        `inputs.rope_index`). None: computed, which needs concrete inputs
        when there are images.
      vision: fixed-shape image inputs (see `inputs.vision_inputs`).
      pixel_values: alternatively, HF's batch-packed float[n, patch_dim]
        with `image_grid_thw` int[n_images, 3] (host arrays, outside jit).
      image_grid_thw: see `pixel_values`.
      image_embeds: precomputed `encode_images` output [B, V, D] (skips
        the vision tower, e.g. when decoding with a cache).
      inputs_embeds: precomputed input embeddings [B, T, D].
      image_mask: bool[B, T], positions that receive visual tokens
        (default: the `<|image_pad|>` tokens).
      attention_probe: rows/columns of attention to return.
      cache: a KVCache to write into and attend over.
      cache_index: first cache slot of the T new tokens (a Python int, or a
        traced scalar when decoding).
      prefix_cache: keys and values [L, b, K, Tp, d] of a prefix shared by
        groups of B / b consecutive rows (a prompt's G sampled responses):
        every query also attends to its group's real prefix keys. The
        prefix is read once per group, never repeated. `attention_mask`,
        `cache` and the probe's key positions >= Tp then refer to each
        row's own keys; key positions < Tp to the prefix.
      prefix_mask: bool[b, Tp], the prefix keys that exist.
      return_logits: compute the float32 logits (else only hidden states).
    """
    cfg = self.config
    if pixel_values is not None and vision is None:
      if image_grid_thw is None:
        raise ValueError("pixel_values needs image_grid_thw")
      pix, grids = inputs_lib.split_hf_images(
          np.asarray(input_ids), pixel_values, image_grid_thw, cfg
      )
      if position_ids is None:
        position_ids, _ = inputs_lib.rope_index(
            np.asarray(input_ids),
            None if attention_mask is None else np.asarray(attention_mask),
            grids,
            cfg,
        )
      n = inputs_lib.bucket_patches(grids, cfg.vision)
      vision = inputs_lib.vision_inputs(pix, grids, n, cfg.vision)
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    s = t if cache is None else cache.length
    if attention_mask is None:
      attention_mask = jnp.ones((b, s), jnp.bool_)
    key_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if key_mask.shape != (b, s):
      raise ValueError(
          f"attention_mask has shape {key_mask.shape}, expected {(b, s)}"
      )
    if position_ids is None:
      if vision is not None or image_embeds is not None:
        raise ValueError(
            "position_ids are required with images inside jit; compute them"
            " with faithful_rl.models.inputs.rope_index"
        )
      if cache is not None:
        raise ValueError("position_ids are required when using a cache")
      pos = jnp.maximum(jnp.cumsum(key_mask, -1) - 1, 0) * key_mask
      position_ids = jnp.broadcast_to(pos[None], (3, b, t))
    position_ids = jnp.asarray(position_ids)

    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    if vision is not None and image_embeds is None:
      image_embeds = self.encode_images(vision)
    if image_embeds is not None:
      inputs_embeds = self.scatter_images(
          inputs_embeds, input_ids, image_embeds, image_mask
      )
    query_slots = cache_index + jnp.arange(t, dtype=jnp.int32)
    if prefix_cache is not None:
      if prefix_mask is None:
        raise ValueError("prefix_cache needs prefix_mask")
      if b % prefix_cache.k.shape[1]:
        raise ValueError(
            f"{b} rows do not split into groups of the prefix's"
            f" {prefix_cache.k.shape[1]} rows"
        )
      prefix_mask = jnp.asarray(prefix_mask).astype(jnp.bool_)
    ctx = _Context(
        key_mask=key_mask,
        query_slots=jnp.broadcast_to(query_slots[None], (b, t)),
        cache_index=cache_index,
        probe=attention_probe,
        impl=self.attention,
        prefix_mask=prefix_mask,
    )
    x, new_cache, visual_attention = self.decode(
        inputs_embeds, position_ids, ctx, cache, prefix_cache
    )
    hidden = self.language_model.norm(x)
    return ModelOutput(
        logits=self.logits(hidden) if return_logits else None,
        hidden=hidden,
        visual_attention=visual_attention,
        cache=new_cache,
    )

  def decode(
      self,
      x,
      position_ids,
      ctx: _Context,
      cache: KVCache | None,
      prefix: KVCache | None = None,
  ):
    """The decoder layers: scanned runs between the probed layers.

    Returns (hidden [B, T, D] before the final norm, the updated cache or
    None, {probed layer: attention}).
    """
    tcfg = self.config.text
    cos, sin = layers.mrope_cos_sin(
        position_ids,
        head_dim=tcfg.head_dim,
        theta=tcfg.rope_theta,
        section=tcfg.mrope_section,
        dtype=x.dtype,
    )
    probe = ctx.probe
    probed = sorted(set(probe.layers)) if probe is not None else []
    for layer_idx in probed:
      if not 0 <= layer_idx < tcfg.num_hidden_layers:
        raise ValueError(
            f"probe layer {layer_idx} out of range [0,"
            f" {tcfg.num_hidden_layers})"
        )
    plain = dataclasses.replace(ctx, probe=None)

    def run(layer, x, per_layer, layer_ctx):
      layer_cache, layer_prefix = per_layer
      x, kv, out = layer(
          layers.shard_batch(x), cos, sin, layer_ctx, layer_cache, layer_prefix
      )
      return x, (kv if cache is not None else None, out)

    def per_layer(start, stop):
      """This run of layers' cache and prefix slices (scan inputs)."""
      take = lambda c: None if c is None else (c.k[start:stop],
                                               c.v[start:stop])  # fmt: skip
      return take(cache), take(prefix)

    # The caches enter as per-layer inputs (never as a scanned carry, which
    # the backward pass would keep once per layer); the layers return their
    # T new keys and values, written into the stacked cache once at the end.
    stack = self.language_model.layers
    n = tcfg.num_hidden_layers
    new_kv, visual_attention, start = [], {}, 0
    for stop in probed + [n]:
      x, ys = layers.run_stack(
          stack,
          lambda layer, x, i, xs: run(layer, x, xs, plain),
          x,
          per_layer(start, stop),
          start=start,
          stop=stop,
          remat=self.remat,
          scan=self.scan_layers,
      )
      if ys is not None and cache is not None:
        new_kv.append(ys[0])
      if stop == n:
        break
      probed_run = lambda layer, x, xs: run(
          layer, x, jax.tree.map(lambda a: a[0], xs), ctx
      )
      if self.remat != "none":
        probed_run = jax.checkpoint(
            probed_run, policy=layers.remat_policy(self.remat)
        )
      x, (kv, out) = probed_run(
          self.language_model.layer(stop), x, per_layer(stop, stop + 1)
      )
      if cache is not None:
        new_kv.append(jax.tree.map(lambda a: a[None], kv))
      visual_attention[stop] = out if probe.per_head else out.mean(axis=1)
      start = stop + 1
    new_cache = None
    if cache is not None:
      k_new = jnp.concatenate([kv[0] for kv in new_kv], axis=0)
      v_new = jnp.concatenate([kv[1] for kv in new_kv], axis=0)
      at = (0, 0, 0, ctx.cache_index, 0)
      new_cache = KVCache(
          k=jax.lax.dynamic_update_slice(cache.k, k_new, at),
          v=jax.lax.dynamic_update_slice(cache.v, v_new, at),
      )
    return x, new_cache, visual_attention
