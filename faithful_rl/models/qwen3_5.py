"""Qwen3.5 (dense: 0.8B-27B) in Flax NNX: the hybrid Gated DeltaNet VLM.

The model is `vlm.VisionLanguageModel` with Qwen3.5's hybrid decoder
(`hybrid.HybridTextModel`: Gated DeltaNet layers with a gated full
attention every fourth layer, zero-centred RMSNorms, partial interleaved
M-RoPE) and Qwen3-VL's vision tower without DeepStack (`transformers`
builds `Qwen3_5VisionModel` from `Qwen3VLVisionModel` minus its DeepStack
mergers): 16-px patches, a learned position table resized per frame, full
attention in every block, a 2x2 merger. Positions (`inputs.rope_index`),
the image processor and the chat template are Qwen3-VL's.

The module registers the family (`families.register`): its configs, the
model class, how its `config.json` reads and writes, its HF names (the
nested layout, `model.language_model.layers.{i}.linear_attn.*` /
`.self_attn.*`; the published checkpoints' multi-token-prediction head
`mtp.*` is not part of the model and is skipped, as transformers does).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from faithful_rl.models import config as config_lib
from faithful_rl.models import families
from faithful_rl.models import hybrid
from faithful_rl.models import qwen3_vl


@dataclasses.dataclass(frozen=True)
class Qwen3_5VisionConfig(qwen3_vl.Qwen3VisionConfig):  # pylint: disable=invalid-name
  """Qwen3-VL's vision tower without DeepStack (transformers' defaults)."""

  out_hidden_size: int = 3584
  deepstack_visual_indexes: tuple[int, ...] = ()

  def __post_init__(self):
    super().__post_init__()
    if self.deepstack_visual_indexes:
      raise ValueError("Qwen3.5's vision tower has no DeepStack mergers")


class Qwen3_5(qwen3_vl.Qwen3_VL):  # pylint: disable=invalid-name
  """Qwen3.5 for conditional generation (arguments: `VisionLanguageModel`)."""

  text_model = hybrid.HybridTextModel


# ---------------------------------------------------------------------------
# config.json.
# ---------------------------------------------------------------------------

_LINEAR_FIELDS = (
    "linear_conv_kernel_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
)


def _from_hf(hf_config) -> config_lib.ModelConfig:
  t = hf_config.text_config
  rope = dict(t.rope_parameters or {})
  return config_lib.ModelConfig(
      family="qwen3_5",
      text=config_lib.text_from_hf(
          t,
          cls=hybrid.HybridTextConfig,
          default_section=(11, 11, 10),
          tie_word_embeddings=bool(hf_config.tie_word_embeddings),
          head_dim=int(t.head_dim),
          qkv_bias=bool(t.attention_bias),
          o_bias=bool(t.attention_bias),
          partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
      ),
      vision=config_lib.vision_from_hf(
          Qwen3_5VisionConfig, hf_config.vision_config
      ),
      **config_lib.token_ids_from_hf(hf_config),
  )


def _to_hf(config: config_lib.ModelConfig):
  from transformers import Qwen3_5Config  # pylint: disable=g-import-not-at-top

  t = config.text
  config_lib.check_switches(
      config, dict(qk_norm=True, mrope_interleaved=True, qkv_bias=t.o_bias)
  )
  kwargs = config_lib.hf_kwargs(config, skip_text=("partial_rotary_factor",))
  del kwargs["ids"]  # the token ids live in the text config only
  del kwargs["vision_config"]["deepstack_visual_indexes"]
  kwargs["text_config"].update(head_dim=t.head_dim, attention_bias=t.qkv_bias)
  kwargs["text_config"]["rope_parameters"].update(
      mrope_interleaved=True, partial_rotary_factor=t.partial_rotary_factor
  )
  return Qwen3_5Config(**kwargs)


# ---------------------------------------------------------------------------
# HF tensors.
# ---------------------------------------------------------------------------


def _layout(path):
  """HF's depthwise Conv1d weight is [C, 1, W]; our kernel [W, C]."""
  if tuple(str(p) for p in path[-2:]) == ("conv1d", "kernel"):
    from faithful_rl.models import convert_hf  # pylint: disable=g-import-not-at-top

    return convert_hf.TensorLayout(
        to_hf=lambda x, config: np.ascontiguousarray(x.T[:, None, :]),
        from_hf=lambda x: x[:, 0, :].T,
        hf_shape=lambda shape, config: (shape[1], 1, shape[0]),
    )
  return None


FAMILY = families.register(
    families.Family(
        name="qwen3_5",
        vision_config=Qwen3_5VisionConfig,
        model_class=Qwen3_5,
        from_hf=_from_hf,
        to_hf=_to_hf,
        roots=qwen3_vl.FAMILY.roots,
        hf_architecture="Qwen3_5ForConditionalGeneration",
        hf_processor="Qwen3VLProcessor",
        patch_buckets=qwen3_vl.FAMILY.patch_buckets,
        layout=_layout,
        skip_hf=("mtp.",),
    )
)
