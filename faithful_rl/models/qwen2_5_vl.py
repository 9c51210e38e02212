"""Qwen2.5-VL in Flax NNX: vision tower + Qwen2 decoder with M-RoPE.

One forward serves training, rollout and evaluation:

* training / evaluation: `model(input_ids, attention_mask=..., vision=...,
  position_ids=..., attention_probe=...)` over whole sequences;
* rollout: the same call with a `KVCache`: the T new tokens are written at
  slots `cache_index .. cache_index + T - 1` and attend to every valid slot
  up to their own (prefill is T = prompt length, decoding T = 1).

The attention probe (`AttentionProbe`) returns, for chosen decoder layers,
the attention of chosen query rows over chosen key columns (the visual
tokens), computed from that layer's own q and k after RoPE with the same
mask, as a thin [B, H, Q, S] product. The layer's output still uses the
regular attention path; no [B, H, T, T] tensor is ever returned.

Axis alphabet: B batch, T query positions, S key positions (= T without a
cache, = cache length with one), H heads, K kv heads, d head dim,
D width, V vocab or visual tokens (named where used), Q probed rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
  """Per-layer keys and values, dtype[B, K, S, d] each.

  Heads before slots, so that a decoding step's two attention products read
  the cache as it lies (a [B, S, K, d] cache is transposed, i.e. copied
  whole, per layer and step).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype):
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    n = cfg.num_hidden_layers
    return cls(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(n)),
    )

  @property
  def length(self) -> int:
    return self.k[0].shape[2]


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


def probe_attention(
    q: jax.Array,
    k: jax.Array,
    key_mask: jax.Array,
    query_slots: jax.Array,
    probe: AttentionProbe,
    scale: float,
) -> jax.Array:
  """The probed attention rows of one layer.

  Args:
    q: [B, T, H, d] queries after RoPE.
    k: [B, K, S, d] keys after RoPE.
    key_mask: bool[B, S], keys that exist.
    query_slots: int32[B, T], key slot of each query (causal bound).
    probe: which rows and columns.
    scale: logit scale.

  Returns:
    float32[B, H, Q, V] probabilities (softmax over all S keys).
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
  logits = logits * scale
  s_idx = jnp.arange(s)
  allowed = key_mask[:, None, :] & (s_idx[None, None, :] <= slot[:, :, None])
  logits = jnp.where(allowed[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  cols = jnp.take_along_axis(
      probs, probe.key_positions[:, None, None, :], axis=-1
  )
  return cols * probe.key_valid[:, None, None, :]


class Attention(nnx.Module):
  """Grouped-query self-attention with biased q/k/v and M-RoPE."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = hd
    self.q_proj = layers.linear(
        d, self.num_heads * hd, bias=True, dtype=dtype, rngs=rngs
    )
    self.k_proj = layers.linear(
        d, self.num_kv_heads * hd, bias=True, dtype=dtype, rngs=rngs
    )
    self.v_proj = layers.linear(
        d, self.num_kv_heads * hd, bias=True, dtype=dtype, rngs=rngs
    )
    self.o_proj = layers.linear(
        self.num_heads * hd, d, bias=False, dtype=dtype, rngs=rngs
    )

  def __call__(self, x, cos, sin, ctx: "_Context", layer_cache):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, d]
    if layer_cache is not None:
      ck, cv = layer_cache
      start = (0, 0, ctx.cache_index, 0)
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
    scale = self.head_dim**-0.5
    out = layers.masked_softmax_attention(
        q, k, v, ctx.mask, scale, heads_first=True
    )
    probe = None
    if ctx.probe is not None:
      probe = probe_attention(
          q, k, ctx.key_mask, ctx.query_slots, ctx.probe, scale
      )
    return self.o_proj(out.reshape(b, t, -1)), (k, v), probe


@dataclasses.dataclass
class _Context:
  """Per-forward values every decoder layer reads."""

  mask: jax.Array  # bool[B, T, S]
  key_mask: jax.Array  # bool[B, S]
  query_slots: jax.Array  # int32[B, T]
  cache_index: Any
  probe: AttentionProbe | None


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.mlp = layers.GatedMLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        bias=False,
        dtype=dtype,
        rngs=rngs,
    )
    eps = cfg.rms_norm_eps
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
    self.post_attention_layernorm = layers.RMSNorm(
        cfg.hidden_size, eps=eps, dtype=dtype
    )

  def __call__(self, x, cos, sin, ctx, layer_cache):
    h, kv, probe = self.self_attn(
        self.input_layernorm(x), cos, sin, ctx, layer_cache
    )
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv, probe


class TextModel(nnx.Module):
  """Token embedding, decoder layers and final norm."""

  def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype,
        param_dtype=dtype,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )
    self.layers = nnx.List([
        DecoderLayer(cfg, dtype=dtype, rngs=rngs)
        for _ in range(cfg.num_hidden_layers)
    ])
    self.norm = layers.RMSNorm(
        cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype
    )


class Qwen2_5_VL(nnx.Module):  # pylint: disable=invalid-name
  """Qwen2.5-VL for conditional generation."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.visual = VisionTower(config.vision, dtype=dtype, rngs=rngs)
    self.language_model = TextModel(config.text, dtype=dtype, rngs=rngs)
    if not config.text.tie_word_embeddings:
      self.lm_head = layers.linear(
          config.text.hidden_size,
          config.text.vocab_size,
          bias=False,
          dtype=dtype,
          rngs=rngs,
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

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32[..., vocab] from final hidden states."""
    if self.config.text.tie_word_embeddings:
      w = self.language_model.embed_tokens.embedding[...]
      out = jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype))
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def head_weight(self) -> jax.Array:
    """The output projection as [D, vocab] (for chunked log-probs)."""
    if self.config.text.tie_word_embeddings:
      return self.language_model.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]

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
      cache_index: first cache slot of the T new tokens (int or scalar).
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
    query_slots = jnp.broadcast_to(query_slots[None], (b, t))
    causal = jnp.arange(s)[None, None, :] <= query_slots[:, :, None]
    ctx = _Context(
        mask=causal & key_mask[:, None, :],
        key_mask=key_mask,
        query_slots=query_slots,
        cache_index=cache_index,
        probe=attention_probe,
    )
    tcfg = cfg.text
    cos, sin = layers.mrope_cos_sin(
        position_ids,
        head_dim=tcfg.head_dim,
        theta=tcfg.rope_theta,
        section=tcfg.mrope_section,
        dtype=inputs_embeds.dtype,
    )
    probed = set(attention_probe.layers) if attention_probe else set()
    for layer_idx in probed:
      if not 0 <= layer_idx < tcfg.num_hidden_layers:
        raise ValueError(
            f"probe layer {layer_idx} out of range [0,"
            f" {tcfg.num_hidden_layers})"
        )
    x = inputs_embeds
    new_k, new_v, visual_attention = [], [], {}
    for i, layer in enumerate(self.language_model.layers):
      layer_ctx = ctx if i in probed else dataclasses.replace(ctx, probe=None)
      layer_cache = None if cache is None else (cache.k[i], cache.v[i])
      x, (k, v), probe_out = layer(x, cos, sin, layer_ctx, layer_cache)
      if cache is not None:
        new_k.append(k)
        new_v.append(v)
      if probe_out is not None:
        visual_attention[i] = (
            probe_out if attention_probe.per_head else probe_out.mean(axis=1)
        )
    hidden = self.language_model.norm(x)
    return ModelOutput(
        logits=self.logits(hidden) if return_logits else None,
        hidden=hidden,
        visual_attention=visual_attention,
        cache=None if cache is None else KVCache(tuple(new_k), tuple(new_v)),
    )
