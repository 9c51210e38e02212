"""What the Qwen-VL vision towers share, in Flax NNX.

Axial 2-D rotary tables (`vision_cos_sin`), attention among the slots of
one segment, optionally within fixed windows (`segment_attention`), the
fused-qkv attention block (`VisionAttention`) and the stacked tower
(`StackedVisionTower`: patch embedding, the blocks as one stacked module,
running a range of them). Each family's tower is in its own module
(`qwen2_5_vl.VisionTower`, `qwen3_vl.VisionTower`).

Patches run in the layout of `inputs.VisionInputs`: with windows, every
attention window occupies exactly `window_patches` consecutive slots
(padding slots at the end of edge windows), so window attention is an
exact block-diagonal product of [windows, c, c], costing what the windows
cost, and full attention is segment-masked over the whole buffer.

Axis alphabet: B batch, P patch slots, W windows, c slots per window,
H heads, d head dim, D width, V merged visual tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl.models import attention as attention_lib
from faithful_rl.models import layers
from faithful_rl.models.config import VisionGeometry
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

  def __init__(self, cfg: VisionGeometry, *, dtype, param_dtype, rngs):
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
