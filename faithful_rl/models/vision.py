"""The Qwen2.5-VL vision tower in Flax NNX.

A ViT over 14-px patches (a Conv3d with stride = kernel, i.e. a linear map
of each flattened patch), 2-D rotary embeddings, window attention in most
blocks and full (per-image) attention in `fullatt_block_indexes`, then a
merger that concatenates each 2x2 group of patches into one visual token.

Window attention runs as a banded product: in window order every window is
a contiguous run of at most `c = window_patches` patches, so the keys of a
query chunk of c patches lie in that chunk and its two neighbours. The cost
is O(P * 3c) instead of O(P^2), with fixed shapes for any image sizes.

Axis alphabet: B batch, P patches, C chunks, c chunk length, H heads,
d head dim, D width, V merged visual tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl.models import layers
from faithful_rl.models.config import VisionConfig
from faithful_rl.models.inputs import VisionInputs


def vision_cos_sin(
    rot_pos: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """Axial 2-D rope tables, float32[B, P, d], from (row, col) positions."""
  spatial = head_dim // 2
  inv_freq = 1.0 / (
      theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial)
  )
  freqs = rot_pos.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, d/4]
  freqs = jnp.concatenate([freqs[..., 0, :], freqs[..., 1, :]], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def segment_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seg: jax.Array,
    *,
    scale: float,
    band: int | None = None,
) -> jax.Array:
  """Attention restricted to equal segment ids.

  Args:
    q, k, v: [B, P, H, d].
    seg: int[B, P]; position i attends to j iff seg[i] == seg[j].
    scale: logit scale.
    band: if set, every segment is a contiguous run of at most `band`
      positions, and attention is computed on a band of 3 * band keys.

  Returns:
    [B, P, H, d].
  """
  if band is None:
    mask = seg[:, :, None] == seg[:, None, :]
    return layers.masked_softmax_attention(q, k, v, mask, scale)
  b, p, h, d = q.shape
  c = band
  n = -(-p // c)
  extra = n * c - p
  if extra:
    pad = ((0, 0), (0, extra), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, extra)), constant_values=-3)

  def neighbours(x, fill):
    widths = [(0, 0)] * x.ndim
    widths[1] = (c, c)
    xp = jnp.pad(x, widths, constant_values=fill)
    xp = xp.reshape((b, n + 2, c) + x.shape[2:])
    return jnp.concatenate([xp[:, :-2], xp[:, 1:-1], xp[:, 2:]], axis=2)

  kb, vb = neighbours(k, 0), neighbours(v, 0)  # [B, C, 3c, H, d]
  segb = neighbours(seg, -2)  # [B, C, 3c]
  segq = seg.reshape(b, n, c)
  mask = segq[..., :, None] == segb[..., None, :]  # [B, C, c, 3c]
  out = layers.masked_softmax_attention(
      q.reshape(b * n, c, h, d),
      kb.reshape(b * n, 3 * c, h, d),
      vb.reshape(b * n, 3 * c, h, d),
      mask.reshape(b * n, c, 3 * c),
      scale,
  )
  return out.reshape(b, n * c, h, d)[:, :p]


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    dim = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.qkv = layers.linear(dim, 3 * dim, bias=True, dtype=dtype, rngs=rngs)
    self.proj = layers.linear(dim, dim, bias=True, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, seg, band):
    b, p, _ = x.shape
    qkv = self.qkv(x).reshape(b, p, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # HF rotates vision q/k in float32, then casts back.
    q = layers.apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
    k = layers.apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
    out = segment_attention(q, k, v, seg, scale=self.head_dim**-0.5, band=band)
    return self.proj(out.reshape(b, p, -1))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.norm1 = layers.RMSNorm(cfg.hidden_size, eps=1e-6, dtype=dtype)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, eps=1e-6, dtype=dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
    self.mlp = layers.GatedMLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        bias=True,
        dtype=dtype,
        rngs=rngs,
    )

  def __call__(self, x, cos, sin, seg, band):
    x = x + self.attn(self.norm1(x), cos, sin, seg, band)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each 2x2 patch group concatenated through a 2-layer MLP."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    ctx = cfg.hidden_size * cfg.merge_unit
    self.ln_q = layers.RMSNorm(cfg.hidden_size, eps=1e-6, dtype=dtype)
    self.mlp_0 = layers.linear(ctx, ctx, bias=True, dtype=dtype, rngs=rngs)
    self.mlp_2 = layers.linear(
        ctx, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs
    )
    self.unit = cfg.merge_unit

  def __call__(self, x: jax.Array) -> jax.Array:
    b, p, dim = x.shape
    x = self.ln_q(x).reshape(b, p // self.unit, self.unit * dim)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
  """Patches -> merged visual tokens: float[B, P, patch_dim] -> [B, V, D]."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.patch_embed = layers.linear(
        cfg.patch_dim, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs
    )
    self.blocks = nnx.List(
        [VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)]
    )
    self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, vis: VisionInputs) -> jax.Array:
    cfg = self.cfg
    dtype = self.patch_embed.kernel.dtype
    pix = jnp.take_along_axis(
        vis.pixel_values, vis.window_perm[..., None], axis=1
    ).astype(dtype)
    x = self.patch_embed(pix)
    cos, sin = vision_cos_sin(vis.rot_pos, cfg.head_dim, cfg.rope_theta)
    band = cfg.window_patches
    for i, block in enumerate(self.blocks):
      if i in cfg.fullatt_block_indexes:
        x = block(x, cos, sin, vis.full_seg, None)
      else:
        x = block(x, cos, sin, vis.window_seg, band)
    merged = self.merger(x)
    return jnp.take_along_axis(merged, vis.merge_restore[..., None], axis=1)
