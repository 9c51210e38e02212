"""The Qwen2.5-VL vision tower in Flax NNX.

A ViT over 14-px patches (a Conv3d with stride = kernel, i.e. a linear map
of each flattened patch), 2-D rotary embeddings, window attention in most
blocks and full (per-image) attention in `fullatt_block_indexes`, then a
merger that concatenates each 2x2 group of patches into one visual token.

The patches run in the window-padded layout of `inputs.VisionInputs`:
every attention window occupies exactly `window_patches` consecutive slots
(padding slots at the end of edge windows), so window attention is an
exact block-diagonal product of [windows, c, c], costing what the windows
cost, and full attention is segment-masked over the whole buffer. The
blocks are one stacked module run as scans over the runs of consecutive
blocks of the same kind (window, full).

Axis alphabet: B batch, P patch slots, W windows, c slots per window,
H heads, d head dim, D width, V merged visual tokens.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl.models import attention as attention_lib
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


def segment_attention(q, k, v, seg, *, scale, window=None, impl="auto"):
  """Attention among slots of equal segment id (non-causal).

  Args:
    q, k, v: [B, P, H, d].
    seg: int[B, P]; slot i attends slot j iff seg[i] == seg[j] (and, with
      `window`, both lie in the same window of `window` slots).
    scale: logit scale.
    window: slots per window, or None for attention over all P slots.
    impl: `attention.attend`'s implementation.

  Returns:
    [B, P, H, d].
  """
  b, p, h, d = q.shape
  if window is not None:
    if p % window:
      raise ValueError(f"{p} patch slots are not whole windows of {window}")
    n = p // window
    q, k, v = (x.reshape(b * n, window, h, d) for x in (q, k, v))
    seg = seg.reshape(b * n, window)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = attention_lib.attend(
      q, heads_first(k), heads_first(v), q_seg=seg, kv_seg=seg, scale=scale,
      impl=impl,
  )  # fmt: skip
  return out.reshape(b, p, h, d)


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    dim = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = layers.linear(dim, 3 * dim, **kw)
    self.proj = layers.linear(dim, dim, **kw)

  def __call__(self, x, cos, sin, seg, window, impl):
    b, p, _ = x.shape
    qkv = self.qkv(x).reshape(b, p, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # HF rotates vision q/k in float32, then casts back.
    q = layers.apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
    k = layers.apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
    out = segment_attention(
        q, k, v, seg, scale=self.head_dim**-0.5, window=window, impl=impl
    )
    return self.proj(out.reshape(b, p, -1))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.RMSNorm(cfg.hidden_size, eps=1e-6, **kw)
    self.norm2 = layers.RMSNorm(cfg.hidden_size, eps=1e-6, **kw)
    self.attn = VisionAttention(cfg, rngs=rngs, **kw)
    self.mlp = layers.GatedMLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        bias=True,
        rngs=rngs,
        **kw,
    )

  def __call__(self, x, cos, sin, seg, window, impl):
    x = x + self.attn(self.norm1(x), cos, sin, seg, window, impl)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each 2x2 patch group concatenated through a 2-layer MLP."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    ctx = cfg.hidden_size * cfg.merge_unit
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.ln_q = layers.RMSNorm(cfg.hidden_size, eps=1e-6, **kw)
    self.mlp_0 = layers.linear(ctx, ctx, bias=True, rngs=rngs, **kw)
    self.mlp_2 = layers.linear(
        ctx, cfg.out_hidden_size, bias=True, rngs=rngs, **kw
    )
    self.unit = cfg.merge_unit

  def __call__(self, x: jax.Array) -> jax.Array:
    b, p, dim = x.shape
    x = self.ln_q(x).reshape(b, p // self.unit, self.unit * dim)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class StackedVisionTower(nnx.Module):
  """What both families' vision towers share: their settings, a linear
  patch embedding, the blocks as one stacked module, and running a range of
  them (scanned and rematerialised as the decoder's layers).

  A family sets `block` (the block class, built as `block(cfg, dtype=...,
  param_dtype=..., rngs=...)`) and `patch_bias`, and adds its other
  modules in `build` (created before the blocks) and `build_mergers`
  (after them). The two hooks keep each family's module creation order,
  and with it the random initialisation a seed gives.
  """

  block: type
  patch_bias: bool

  def __init__(
      self,
      cfg,
      *,
      dtype,
      param_dtype=None,
      remat: str = "none",
      attention: str = "auto",
      scan_layers: bool = True,
      rngs: nnx.Rngs,
  ):
    param_dtype = param_dtype or dtype
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.attention = attention
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = layers.linear(
        cfg.patch_dim, cfg.hidden_size, bias=self.patch_bias, rngs=rngs, **kw
    )
    self.build(cfg, rngs=rngs, **kw)
    self.blocks = layers.stacked(
        cfg.depth, lambda r: self.block(cfg, rngs=r, **kw), rngs
    )
    self.build_mergers(cfg, rngs=rngs, **kw)

  def build(self, cfg, *, dtype, param_dtype, rngs) -> None:
    """Modules created before the blocks (none by default)."""

  def build_mergers(self, cfg, *, dtype, param_dtype, rngs) -> None:
    """Modules created after the blocks: the mergers."""
    raise NotImplementedError

  def embed_patches(self, vis: VisionInputs) -> jax.Array:
    """Each slot's patch through the patch embedding: [B, P, D]."""
    pix = jnp.take_along_axis(
        vis.pixel_values, vis.patch_index[..., None], axis=1
    )
    return self.patch_embed(pix.astype(self.dtype))

  def run_blocks(self, run, x: jax.Array, start: int, stop: int) -> jax.Array:
    """Blocks [start, stop) over x; `run(block, x, i, xs) -> (x, None)`."""
    x, _ = layers.run_stack(
        self.blocks,
        run,
        x,
        start=start,
        stop=stop,
        remat=self.remat,
        scan=self.scan_layers,
    )
    return x


class VisionTower(StackedVisionTower):
  """Patches -> merged visual tokens: float[B, P, patch_dim] -> [B, V, D]."""

  block = VisionBlock
  patch_bias = False

  def build_mergers(self, cfg, *, dtype, param_dtype, rngs):
    self.merger = PatchMerger(
        cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def block_runs(self) -> list[tuple[int, int, bool]]:
    """[(start, stop, full attention)] runs of blocks of one kind."""
    full = [i in self.cfg.fullatt_block_indexes for i in range(self.cfg.depth)]
    runs, start = [], 0
    for kind, group in itertools.groupby(full):
      n = len(list(group))
      runs.append((start, start + n, kind))
      start += n
    return runs

  def __call__(self, vis: VisionInputs) -> jax.Array:
    cfg = self.cfg
    x = self.embed_patches(vis)
    cos, sin = vision_cos_sin(vis.rot_pos, cfg.head_dim, cfg.rope_theta)
    seg = vis.patch_seg
    in_window = jnp.where(seg >= 0, 0, -1)  # one window: real vs padding

    for start, stop, full in self.block_runs():
      window = None if full else cfg.window_patches
      block_seg = seg if full else in_window

      def run(block, x, i, xs, window=window, block_seg=block_seg):
        del i, xs
        x = layers.shard_batch(x)
        return block(x, cos, sin, block_seg, window, self.attention), None

      x = self.run_blocks(run, x, start, stop)
    merged = self.merger(x)
    return jnp.take_along_axis(merged, vis.merge_restore[..., None], axis=1)
