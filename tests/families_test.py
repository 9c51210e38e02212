"""The model-family registry: every family-dependent table reads it."""

import dataclasses

from flax import nnx
import pytest

from faithful_rl import models
from faithful_rl.models import archs
from faithful_rl.models import convert_hf
from faithful_rl.models import families
from faithful_rl.models import qwen2_5_vl
from faithful_rl.models import qwen3_vl
import helpers


def test_the_built_in_families_are_registered_by_their_modules():
  assert families.names() == ("qwen2_5_vl", "qwen3_5", "qwen3_vl")
  assert families.get("qwen2_5_vl") is qwen2_5_vl.FAMILY
  assert families.get("qwen3_vl").model_class is qwen3_vl.Qwen3_VL
  with pytest.raises(
      ValueError, match="supported: qwen2_5_vl, qwen3_5, qwen3_vl"
  ):
    families.get("llava")
  assert archs.variants("qwen2_5_vl") == ("3b", "7b")
  assert archs.variants("qwen3_vl") == ("2b", "4b", "8b", "32b")


def test_a_family_registered_here_is_what_create_and_convert_hf_use():
  """A copy of Qwen2.5-VL under another name and other HF prefixes: the
  model class, the vision config it takes and the tensor names follow."""

  class Other(qwen2_5_vl.Qwen2_5_VL):
    pass

  other = families.register(
      dataclasses.replace(
          qwen2_5_vl.FAMILY,
          name="test_other",
          model_class=Other,
          roots={"visual": "vit", "language_model": "llm",
                 "lm_head": "head"},  # fmt: skip
      )
  )
  try:
    config = helpers.tiny_config().replace(family="test_other")
    model = nnx.eval_shape(lambda: models.create(config))
    assert type(model) is Other
    assert convert_hf.model_class(config) is Other
    path = ("language_model", "layers", "mlp", "down_proj", "kernel")
    assert convert_hf.hf_names(path, (3, 96, 64), "test_other") == [
        f"llm.layers.{i}.mlp.down_proj.weight" for i in range(3)
    ]
    assert convert_hf.normalize_hf_name("visual.blocks.0.x", "test_other") == (
        "vit.blocks.0.x"
    )
    with pytest.raises(ValueError, match="needs a VisionConfig"):
      config.replace(vision=helpers.tiny_qwen3_config().vision)
  finally:
    families._REGISTRY.pop(other.name)  # pylint: disable=protected-access
