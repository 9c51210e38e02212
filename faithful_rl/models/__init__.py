"""Qwen-VL models (Qwen2.5-VL, Qwen3-VL) in Flax NNX, with HF checkpoints.

model = models.from_pretrained(hf_dir, dtype=jnp.bfloat16)
out = model(input_ids, attention_mask=..., pixel_values=...,
            image_grid_thw=..., attention_probe=...)
models.save_pretrained(model, out_dir)

Each family is one module registered in `families` (see docs/design.md,
"Adding a model family").
"""

from faithful_rl.models import families
from faithful_rl.models.config import CheckpointError
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import read_config
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.models.inputs import layout_patches
from faithful_rl.models.inputs import rope_index
from faithful_rl.models.inputs import vision_inputs
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import KVCache
from faithful_rl.models.qwen2_5_vl import ModelOutput
from faithful_rl.models.qwen2_5_vl import Qwen2_5_VL
from faithful_rl.models.qwen2_5_vl import VisionConfig
from faithful_rl.models.qwen2_5_vl import visual_token_positions
from faithful_rl.models.qwen3_vl import Qwen3_VL
from faithful_rl.models.qwen3_vl import Qwen3VisionConfig
from faithful_rl.models.vlm import VisionLanguageModel

# Loaded on first use, so that `python -m faithful_rl.models.convert_hf`
# runs a module the package has not imported yet.
_CONVERT = ("from_pretrained", "load_orbax", "save_orbax", "save_pretrained")


def __getattr__(name: str):
  if name in _CONVERT:
    from faithful_rl.models import convert_hf  # pylint: disable=g-import-not-at-top

    return getattr(convert_hf, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create(config: ModelConfig, *, dtype=None, seed: int = 0, **options):
  """A randomly initialised model of `config.family`.

  `options`: `param_dtype` (default `dtype`), `remat`, `attention`,
  `scan_layers` (see `VisionLanguageModel`).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import convert_hf  # pylint: disable=g-import-not-at-top

  return families.get(config.family).model_class(
      config,
      dtype=dtype or jnp.float32,
      rngs=nnx.Rngs(seed),
      **convert_hf.model_options(**options),
  )
