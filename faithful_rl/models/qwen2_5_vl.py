"""Qwen2.5-VL in Flax NNX: a windowed ViT + the Qwen2 decoder with M-RoPE.

The model is `vlm.VisionLanguageModel` (the shared forward: training,
rollout with a KV cache, the attention probe; see `vlm` and `decoder`)
with Qwen2.5-VL's vision tower (`vision.VisionTower`): 14-px patches,
window attention in most blocks, a 2x2 RMSNorm merger. Its decoder is
`TextConfig`'s default (biased q/k/v, chunked M-RoPE sections).

The decoder's pieces are re-exported here, where the rest of the package
has always imported them from.
"""

from __future__ import annotations

from faithful_rl.models.decoder import Attention  # pylint: disable=unused-import
from faithful_rl.models.decoder import AttentionProbe  # pylint: disable=unused-import
from faithful_rl.models.decoder import Context
from faithful_rl.models.decoder import DecoderLayer  # pylint: disable=unused-import
from faithful_rl.models.decoder import KVCache  # pylint: disable=unused-import
from faithful_rl.models.decoder import ModelOutput  # pylint: disable=unused-import
from faithful_rl.models.decoder import TextModel  # pylint: disable=unused-import
from faithful_rl.models.decoder import probe_attention  # pylint: disable=unused-import
from faithful_rl.models.decoder import visual_token_positions  # pylint: disable=unused-import
from faithful_rl.models.vision import VisionTower
from faithful_rl.models.vlm import VisionLanguageModel

_Context = Context  # the name tests built contexts under


class Qwen2_5_VL(VisionLanguageModel):  # pylint: disable=invalid-name
  """Qwen2.5-VL for conditional generation (arguments: `VisionLanguageModel`)."""

  vision_tower = VisionTower
