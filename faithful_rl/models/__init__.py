"""Qwen-VL models in Flax NNX, loading and saving HF checkpoints.

model = models.from_pretrained(hf_dir, dtype=jnp.bfloat16)
out = model(input_ids, attention_mask=..., pixel_values=...,
            image_grid_thw=..., attention_probe=...)
models.save_pretrained(model, out_dir)
"""

from faithful_rl.models.config import CheckpointError
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import VisionConfig
from faithful_rl.models.config import read_config
from faithful_rl.models.convert_hf import from_pretrained
from faithful_rl.models.convert_hf import load_orbax
from faithful_rl.models.convert_hf import save_orbax
from faithful_rl.models.convert_hf import save_pretrained
from faithful_rl.models.inputs import VisionInputs
from faithful_rl.models.inputs import layout_patches
from faithful_rl.models.inputs import rope_index
from faithful_rl.models.inputs import vision_inputs
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import KVCache
from faithful_rl.models.qwen2_5_vl import ModelOutput
from faithful_rl.models.qwen2_5_vl import Qwen2_5_VL
from faithful_rl.models.qwen2_5_vl import visual_token_positions


def create(config: ModelConfig, *, dtype=None, seed: int = 0, **options):
  """A randomly initialised model of `config.family`.

  `options`: `param_dtype` (default `dtype`), `remat`, `attention`,
  `scan_layers` (see `Qwen2_5_VL`).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import convert_hf  # pylint: disable=g-import-not-at-top

  return convert_hf.model_class(config)(
      config,
      dtype=dtype or jnp.float32,
      rngs=nnx.Rngs(seed),
      **convert_hf.model_options(**options),
  )
