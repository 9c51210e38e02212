"""Qwen3-VL (dense: 2B, 4B, 8B, 32B) in Flax NNX.

The model is `vlm.VisionLanguageModel` (the shared forward: training,
rollout with a KV cache, the attention probe) with the Qwen3 decoder
(`TextConfig` with `qk_norm`, no biases, an explicit head_dim, interleaved
M-RoPE) and this module's vision tower:

* 16-px patches through a linear map with a bias (HF's Conv3d), plus a
  learned square position table (48 x 48 published) resized to each
  frame's patch grid by bilinear interpolation with aligned corners;
* LayerNorm blocks, full attention over each frame in every block (the
  patches lie back to back in `inputs.VisionInputs`, no windows), axial
  2-D RoPE, a non-gated tanh-GELU MLP;
* a 2x2 merger (LayerNorm over each patch, MLP over the 4 concatenated)
  giving the visual tokens, and DeepStack mergers (LayerNorm over the 4
  concatenated) applied to the outputs of blocks `deepstack_visual_indexes`:
  their features are added to the visual positions after the first decoder
  layers (`vlm.VisionLanguageModel.decode`).

The module registers the family (`families.register`): its configs, the
model class, how its `config.json` reads and writes, its HF names.

Axis alphabet: B batch, P patch slots, D width, V merged visual tokens,
N DeepStack levels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import layers
from faithful_rl.models import config as config_lib
from faithful_rl.models import families
from faithful_rl.models.config import VisionGeometry
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.models.vision import StackedVisionTower
from faithful_rl.models.vision import VisionAttention
from faithful_rl.models.vision import vision_cos_sin
from faithful_rl.models.vlm import VisionLanguageModel


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(VisionGeometry):
  """Qwen3-VL vision tower: 16-px patches with a learned position table,
  LayerNorm blocks with full attention, a 2x2 merger and DeepStack mergers
  whose outputs feed the first decoder layers."""

  depth: int = 27
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 16
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  out_hidden_size: int = 4096
  num_position_embeddings: int = 2304
  deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
  hidden_act: str = "gelu_pytorch_tanh"
  rope_theta: float = 10000.0

  has_windows = False  # every block attends over its whole frame

  def __post_init__(self):
    side = int(round(self.num_position_embeddings**0.5))
    if side * side != self.num_position_embeddings:
      raise ValueError(
          f"vision num_position_embeddings={self.num_position_embeddings} is"
          " not a square (the position table is side x side)"
      )
    bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(
          f"vision deepstack_visual_indexes {bad} outside [0, {self.depth})"
      )

  @property
  def position_side(self) -> int:
    """Side of the learned position table (48 for the published sizes)."""
    return int(round(self.num_position_embeddings**0.5))

  @property
  def slot_multiple(self) -> int:
    return self.merge_unit


def position_taps(
    rot_pos: jax.Array, patch_seg: jax.Array, side: int
) -> tuple[jax.Array, jax.Array]:
  """Bilinear taps of the learned position table for every patch slot.

  As `transformers`' `get_vision_interpolation_indices_and_weights`
  (bilinear, align_corners=True): a patch at row r of a frame h patches
  high samples table row src = r * (side - 1) / max(h - 1, 1) from rows
  floor(src) and floor(src) + 1 (clamped), weighted 1 - |src - row|; the
  same for columns. A frame's size is read off its slots' largest
  (row, col), so the layout needs no further input.

  Args:
    rot_pos: int[B, P, 2], (row, col) of each slot's patch.
    patch_seg: int[B, P], each slot's frame (-1: padding).
    side: side of the square table.

  Returns:
    indices int32[B, P, 4] into the flattened table, weights float32[B, P,
    4].
  """
  p = patch_seg.shape[1]
  frame = jnp.where(patch_seg >= 0, patch_seg, p)  # padding: its own frame

  def sizes(pos, seg):
    return jax.ops.segment_max(pos, seg, num_segments=p + 1)[seg] + 1

  size = jax.vmap(sizes)(rot_pos, frame)  # [B, P, 2]: (h, w) of the frame
  index = rot_pos.astype(jnp.float32)
  src = index * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
  floor = jnp.floor(src)
  offsets = jnp.arange(2, dtype=jnp.float32)
  taps = jnp.clip(floor[..., None] + offsets, 0, side - 1).astype(jnp.int32)
  weights = jnp.maximum(
      1 - jnp.abs(src[..., None] - floor[..., None] - offsets), 0
  )  # [B, P, 2 axes, 2 taps]
  idx = taps[..., 0, :, None] * side + taps[..., 1, None, :]
  w = weights[..., 0, :, None] * weights[..., 1, None, :]
  b = rot_pos.shape[0]
  return idx.reshape(b, p, 4), w.reshape(b, p, 4)


class VisionBlock(nnx.Module):
  """LayerNorm -> attention -> LayerNorm -> MLP, both residual."""

  def __init__(self, cfg: Qwen3VisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.LayerNorm(cfg.hidden_size, eps=1e-6, **kw)
    self.norm2 = layers.LayerNorm(cfg.hidden_size, eps=1e-6, **kw)
    self.attn = VisionAttention(cfg, rngs=rngs, **kw)
    self.mlp = layers.MLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        rngs=rngs,
        **kw,
    )

  def __call__(self, x, cos, sin, seg, impl):
    x = x + self.attn(self.norm1(x), cos, sin, seg, None, impl)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """Each 2x2 patch group -> one token: LayerNorm, concatenate, 2-layer MLP.

  `postshuffle` (the DeepStack mergers) normalises the concatenated group
  instead of each patch.
  """

  def __init__(
      self, cfg: Qwen3VisionConfig, *, postshuffle, dtype, param_dtype, rngs
  ):
    unit = cfg.merge_unit
    ctx = cfg.hidden_size * unit
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = layers.LayerNorm(
        ctx if postshuffle else cfg.hidden_size, eps=1e-6, **kw
    )
    self.linear_fc1 = layers.linear(ctx, ctx, bias=True, rngs=rngs, **kw)
    self.linear_fc2 = layers.linear(
        ctx, cfg.out_hidden_size, bias=True, rngs=rngs, **kw
    )
    self.unit = unit
    self.postshuffle = postshuffle

  def __call__(self, x: jax.Array) -> jax.Array:
    b, p, dim = x.shape
    if not self.postshuffle:
      x = self.norm(x)
    x = x.reshape(b, p // self.unit, self.unit * dim)
    if self.postshuffle:
      x = self.norm(x)
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionTower(StackedVisionTower):
  """Patches -> (visual tokens [B, V, D], DeepStack features [N, B, V, D])."""

  block = VisionBlock
  patch_bias = True

  def build(self, cfg, *, dtype, param_dtype, rngs):
    self.pos_embed = nnx.Embed(
        cfg.num_position_embeddings,
        cfg.hidden_size,
        embedding_init=nnx.initializers.normal(0.02),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )

  def build_mergers(self, cfg, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.merger = PatchMerger(cfg, postshuffle=False, rngs=rngs, **kw)
    self.deepstack_merger_list = (
        layers.stacked(
            len(cfg.deepstack_visual_indexes),
            lambda r: PatchMerger(cfg, postshuffle=True, rngs=r, **kw),
            rngs,
        )
        if cfg.deepstack_visual_indexes
        else None
    )

  def position_embeddings(self, vis: VisionInputs) -> jax.Array:
    """The resized position table at every slot: [B, P, D] (float32 sums,
    as `transformers`, cast to the compute dtype)."""
    idx, w = position_taps(vis.rot_pos, vis.patch_seg, self.cfg.position_side)
    table = self.pos_embed.embedding[...].astype(self.dtype)
    rows = jnp.take(table, idx, axis=0).astype(jnp.float32)  # [B, P, 4, D]
    return jnp.einsum("bpkd,bpk->bpd", rows, w).astype(self.dtype)

  def __call__(self, vis: VisionInputs):
    cfg = self.cfg
    x = self.embed_patches(vis)
    x = x + self.position_embeddings(vis)
    cos, sin = vision_cos_sin(vis.rot_pos, cfg.head_dim, cfg.rope_theta)
    seg = vis.patch_seg

    def run(block, x, i, xs):
      del i, xs
      x = layers.shard_batch(x)
      return block(x, cos, sin, seg, self.attention), None

    # HF: the k-th feature (by block) comes from merger indexes.index(block).
    indexes = list(cfg.deepstack_visual_indexes)
    taps = sorted(set(indexes))
    tapped, start = [], 0
    for stop in [i + 1 for i in taps] + [cfg.depth]:
      x = self.run_blocks(run, x, start, stop)
      start = stop
      if len(tapped) < len(taps):
        tapped.append(x)
    restore = lambda t: jnp.take_along_axis(
        t, vis.merge_restore[..., None], axis=1
    )
    tokens = restore(self.merger(x))
    if not tapped:
      return tokens, None
    # All DeepStack mergers at once, over their stacked parameters (taking
    # one merger out of the stack would copy its weights).
    graphdef, state = nnx.split(self.deepstack_merger_list)
    order = [indexes.index(t) for t in taps]
    if order != list(range(len(indexes))):
      state = jax.tree.map(lambda a: a[np.asarray(order)], state)
    features = jax.vmap(lambda st, h: nnx.merge(graphdef, st)(h))(
        state, jnp.stack(tapped)
    )
    return tokens, jax.vmap(restore)(features)


class Qwen3_VL(VisionLanguageModel):  # pylint: disable=invalid-name
  """Qwen3-VL for conditional generation (arguments: `VisionLanguageModel`)."""

  vision_tower = VisionTower

  def vision_features(self, vision: VisionInputs):
    """(visual tokens [B, V, D], DeepStack features [N, B, V, D] or None)."""
    return self.visual(vision)


# ---------------------------------------------------------------------------
# config.json.
# ---------------------------------------------------------------------------

# The decoder switches Qwen3-VL's config implies; its one `attention_bias`
# sets qkv_bias and o_bias together.
QWEN3_TEXT = dict(
    qkv_bias=False, o_bias=False, qk_norm=True, mrope_interleaved=True
)


def _from_hf(hf_config) -> config_lib.ModelConfig:
  t = hf_config.text_config
  bias = bool(t.attention_bias)
  return config_lib.ModelConfig(
      family="qwen3_vl",
      text=config_lib.text_from_hf(
          t,
          tie_word_embeddings=bool(hf_config.tie_word_embeddings),
          head_dim=int(t.head_dim),
          **dict(QWEN3_TEXT, qkv_bias=bias, o_bias=bias),
      ),
      vision=config_lib.vision_from_hf(
          Qwen3VisionConfig, hf_config.vision_config
      ),
      **config_lib.token_ids_from_hf(hf_config),
  )


def _to_hf(config: config_lib.ModelConfig):
  from transformers import Qwen3VLConfig  # pylint: disable=g-import-not-at-top

  t = config.text
  config_lib.check_switches(
      config, dict(qk_norm=True, mrope_interleaved=True, qkv_bias=t.o_bias)
  )
  kwargs = config_lib.hf_kwargs(config)
  del kwargs["ids"]  # Qwen3-VL's token ids live in its text config only
  kwargs["text_config"].update(head_dim=t.head_dim, attention_bias=t.qkv_bias)
  kwargs["text_config"]["rope_parameters"]["mrope_interleaved"] = True
  return Qwen3VLConfig(**kwargs)


FAMILY = families.register(
    families.Family(
        name="qwen3_vl",
        vision_config=Qwen3VisionConfig,
        model_class=Qwen3_VL,
        from_hf=_from_hf,
        to_hf=_to_hf,
        roots={"visual": "model.visual",
               "language_model": "model.language_model",
               "lm_head": "lm_head"},  # fmt: skip
        hf_architecture="Qwen3VLForConditionalGeneration",
        hf_processor="Qwen3VLProcessor",
        # No windows: an image's 1,280 tokens are 5,120 patches.
        patch_buckets=(1024, 2048, 4096, 5120),
        stacked=(("visual", "deepstack_merger_list"),),
    )
)
