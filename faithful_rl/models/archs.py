"""Published Qwen-VL architectures (from their config.json), by name.

Used where the shape of a model is needed without its weights (planning a
mesh, `jax.eval_shape` of a recipe, tests); `from_pretrained` always reads
the checkpoint's own config.json.

This module imports every model family's module (`families` loads it to
find them): a new family adds its import and its sizes here.
"""

from faithful_rl.models import qwen3_5  # pylint: disable=unused-import
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.qwen2_5_vl import VisionConfig
from faithful_rl.models.qwen3_vl import QWEN3_TEXT
from faithful_rl.models.qwen3_vl import Qwen3VisionConfig

_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
    tokens_per_second=2,
)

# Qwen3-VL: every size has head_dim 128, vocabulary 151,936, theta 5e6,
# interleaved M-RoPE sections (24, 20, 20); two vision towers.
_QWEN3_TEXT = dict(
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=8,
    rope_theta=5000000.0,
    mrope_section=(24, 20, 20),
    max_position_embeddings=262144,
    **QWEN3_TEXT,
)
_QWEN3_VISION_SMALL = dict(  # 2B, 4B
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    deepstack_visual_indexes=(5, 11, 17),
)
_QWEN3_VISION_LARGE = dict(  # 8B, 32B
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    deepstack_visual_indexes=(8, 16, 24),
)


def _qwen3(hidden, layers, heads, inter, tied, vision) -> ModelConfig:
  return ModelConfig(
      family="qwen3_vl",
      text=TextConfig(
          hidden_size=hidden,
          num_hidden_layers=layers,
          num_attention_heads=heads,
          intermediate_size=inter,
          tie_word_embeddings=tied,
          **_QWEN3_TEXT,
      ),
      vision=Qwen3VisionConfig(out_hidden_size=hidden, **vision),
  )


ARCHS = {
    "qwen2_5_vl_3b": ModelConfig(
        text=TextConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        vision=VisionConfig(out_hidden_size=2048, **_VISION),
    ),
    "qwen2_5_vl_7b": ModelConfig(
        text=TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        vision=VisionConfig(out_hidden_size=3584, **_VISION),
    ),
    "qwen3_vl_2b": _qwen3(2048, 28, 16, 6144, True, _QWEN3_VISION_SMALL),
    "qwen3_vl_4b": _qwen3(2560, 36, 32, 9728, True, _QWEN3_VISION_SMALL),
    "qwen3_vl_8b": _qwen3(4096, 36, 32, 12288, False, _QWEN3_VISION_LARGE),
    "qwen3_vl_32b": _qwen3(5120, 64, 64, 25600, False, _QWEN3_VISION_LARGE),
}


def get(name: str) -> ModelConfig:
  if name not in ARCHS:
    raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
  return ARCHS[name]


def variants(family: str) -> tuple[str, ...]:
  """The sizes of `family` named here ("3b", "7b" of qwen2_5_vl_3b, ...)."""
  prefix = f"{family}_"
  return tuple(
      n[len(prefix) :]
      for n, c in ARCHS.items()
      if c.family == family and n.startswith(prefix)
  )
