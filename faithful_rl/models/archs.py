"""Published Qwen-VL architectures (from their config.json), by name.

Used where the shape of a model is needed without its weights (planning a
mesh, `jax.eval_shape` of a recipe, tests); `from_pretrained` always reads
the checkpoint's own config.json.
"""

from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import VisionConfig

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
}


def get(name: str) -> ModelConfig:
  if name not in ARCHS:
    raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
  return ARCHS[name]
