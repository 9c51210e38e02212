"""Qwen2.5-VL in Flax NNX: a windowed ViT + the Qwen2 decoder with M-RoPE.

The model is `vlm.VisionLanguageModel` (the shared forward: training,
rollout with a KV cache, the attention probe; see `vlm` and `decoder`)
with this module's vision tower: a ViT over 14-px patches (a Conv3d with
stride = kernel, i.e. a linear map of each flattened patch), 2-D rotary
embeddings, window attention in most blocks and full (per-image)
attention in `fullatt_block_indexes`, then a merger that concatenates
each 2x2 group of patches into one visual token (RMSNorm, 2-layer MLP).
The blocks run as scans over the runs of consecutive blocks of the same
kind (window, full). Its decoder is `TextConfig`'s default (biased q/k/v,
chunked M-RoPE sections).

The module registers the family (`families.register`): its configs, the
model class, how its `config.json` reads and writes, its HF names. The
decoder's pieces are re-exported here, where the rest of the package has
always imported them from.

Axis alphabet: B batch, P patch slots, D width, V merged visual tokens.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl.models import config as config_lib
from faithful_rl.models import families
from faithful_rl.models import layers
from faithful_rl.models.config import VisionGeometry
from faithful_rl.models.decoder import Attention  # pylint: disable=unused-import
from faithful_rl.models.decoder import AttentionProbe  # pylint: disable=unused-import
from faithful_rl.models.decoder import Context
from faithful_rl.models.decoder import DecoderLayer  # pylint: disable=unused-import
from faithful_rl.models.decoder import KVCache  # pylint: disable=unused-import
from faithful_rl.models.decoder import ModelOutput  # pylint: disable=unused-import
from faithful_rl.models.decoder import TextModel  # pylint: disable=unused-import
from faithful_rl.models.decoder import probe_attention  # pylint: disable=unused-import
from faithful_rl.models.decoder import visual_token_positions  # pylint: disable=unused-import
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.models.vision import StackedVisionTower
from faithful_rl.models.vision import VisionAttention
from faithful_rl.models.vision import vision_cos_sin
from faithful_rl.models.vlm import VisionLanguageModel

_Context = Context  # the name tests built contexts under


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionGeometry):
  """Qwen2.5-VL vision tower (ViT with window attention and a 2x2 merger)."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  tokens_per_second: int = 2

  @property
  def window_patches(self) -> int:
    """Most patches one attention window can hold."""
    m = self.spatial_merge_size
    side = (self.window_size // m // self.patch_size) * m
    return side * side

  @property
  def has_windows(self) -> bool:
    """Whether some block uses window attention."""
    return any(i not in self.fullatt_block_indexes for i in range(self.depth))

  @property
  def slot_multiple(self) -> int:
    """A patch bucket is a multiple of this (whole attention windows)."""
    return self.window_patches if self.has_windows else self.merge_unit


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


class Qwen2_5_VL(VisionLanguageModel):  # pylint: disable=invalid-name
  """Qwen2.5-VL for conditional generation (arguments: `VisionLanguageModel`)."""

  vision_tower = VisionTower


# ---------------------------------------------------------------------------
# config.json.
# ---------------------------------------------------------------------------

# The decoder switches Qwen2.5-VL's config implies (Qwen2: biased q/k/v).
TEXT = dict(qkv_bias=True, o_bias=False, qk_norm=False, mrope_interleaved=False)


def _from_hf(hf_config) -> config_lib.ModelConfig:
  return config_lib.ModelConfig(
      family="qwen2_5_vl",
      text=config_lib.text_from_hf(
          hf_config.text_config,
          tie_word_embeddings=bool(hf_config.tie_word_embeddings),
          head_dim=None,
          **TEXT,
      ),
      vision=config_lib.vision_from_hf(VisionConfig, hf_config.vision_config),
      **config_lib.token_ids_from_hf(hf_config),
  )


def _to_hf(config: config_lib.ModelConfig):
  from transformers import Qwen2_5_VLConfig  # pylint: disable=g-import-not-at-top

  config_lib.check_switches(config, TEXT)
  if not config.text.derived_head_dim:
    raise ValueError(
        "this qwen2_5_vl text config cannot be written as a transformers"
        f" config: {dict(head_dim=config.text.head_dim)}"
    )
  kwargs = config_lib.hf_kwargs(config)
  ids = kwargs.pop("ids")
  return Qwen2_5_VLConfig(**kwargs, **ids)


FAMILY = families.register(
    families.Family(
        name="qwen2_5_vl",
        vision_config=VisionConfig,
        model_class=Qwen2_5_VL,
        from_hf=_from_hf,
        to_hf=_to_hf,
        roots={"visual": "visual", "language_model": "model",
               "lm_head": "lm_head"},  # fmt: skip
        hf_architecture="Qwen2_5_VLForConditionalGeneration",
        hf_processor="Qwen2_5_VLProcessor",
        # The window layout pads a near-square image's 1,280 tokens to 80-81
        # windows of 64 patches, 5,120-5,184 slots.
        patch_buckets=(1024, 2048, 4096, 6144),
    )
)
