"""Model configs: frozen, hashable dataclasses read from HF `config.json`.

The dataclasses are static arguments of jitted functions, so every field is
an immutable Python value (ints, floats, strings, tuples).

Two families: Qwen2.5-VL (`VisionConfig`, a windowed ViT) and Qwen3-VL
(`Qwen3VisionConfig`, a ViT with a learned position table and DeepStack
mergers); both share `TextConfig`, whose switches (`qkv_bias`, `qk_norm`,
`mrope_interleaved`, an explicit `head_dim`) say which decoder it is.

Both layouts of Qwen-VL `config.json` are read: the flat one of the
published Qwen2.5-VL checkpoints (text fields at top level, `rope_scaling`
with `mrope_section`) and the nested one of Qwen3-VL and `transformers>=5`
(`text_config`, `rope_parameters`). We normalise through `transformers`'
own config classes, so our reading of a checkpoint's config is theirs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read; the message names the file."""


class _VisionGeometry:
  """Patch and token geometry shared by the vision configs."""

  in_channels: int
  patch_size: int
  temporal_patch_size: int
  spatial_merge_size: int
  hidden_size: int
  num_heads: int

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch."""
    return (
        self.in_channels
        * self.temporal_patch_size
        * self.patch_size
        * self.patch_size
    )

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  @property
  def token_pixels(self) -> int:
    """Side in pixels of one merged visual token (28 / 32 px)."""
    return self.patch_size * self.spatial_merge_size


@dataclasses.dataclass(frozen=True)
class VisionConfig(_VisionGeometry):
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


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(_VisionGeometry):
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


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The decoder: grouped-query attention with M-RoPE.

  Qwen2.5-VL's (Qwen2) by default; Qwen3-VL's (Qwen3) has no attention
  biases, RMSNorm on each head's q and k before RoPE (`qk_norm`), an
  explicit `head_dim` and interleaved M-RoPE frequencies.

  `head_dim=None` means hidden_size / num_attention_heads and is resolved
  on construction; `replace` re-derives it when the sizes change.
  """

  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  head_dim: int | None = None
  qkv_bias: bool = True  # biases on q/k/v (Qwen3: `attention_bias`)
  o_bias: bool = False  # a bias on o_proj (Qwen3: `attention_bias`)
  qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm
  mrope_interleaved: bool = False  # Qwen3's THWTHW... frequency layout

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(
          self, "head_dim", self.hidden_size // self.num_attention_heads
      )

  @property
  def derived_head_dim(self) -> bool:
    """Whether head_dim is hidden_size / num_attention_heads."""
    return self.head_dim == self.hidden_size // self.num_attention_heads

  def replace(self, **kwargs) -> "TextConfig":
    """`dataclasses.replace`, keeping a derived head_dim derived."""
    sizes = {"hidden_size", "num_attention_heads"}
    if "head_dim" not in kwargs and sizes & set(kwargs):
      if self.derived_head_dim:
        kwargs["head_dim"] = None
    return dataclasses.replace(self, **kwargs)


# The decoder switches each family's HF config implies.
QWEN3_TEXT = dict(
    qkv_bias=False, o_bias=False, qk_norm=True, mrope_interleaved=True
)
_QWEN2_5_TEXT = dict(
    qkv_bias=True, o_bias=False, qk_norm=False, mrope_interleaved=False
)
_VISION_CLASSES = {"qwen2_5_vl": VisionConfig, "qwen3_vl": Qwen3VisionConfig}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole Qwen-VL model: family, text and vision configs, token ids."""

  family: str = "qwen2_5_vl"
  text: TextConfig = TextConfig()
  vision: VisionConfig | Qwen3VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None

  def __post_init__(self):
    want = _VISION_CLASSES.get(self.family)
    if want is None:
      raise ValueError(
          f"unknown model family {self.family!r}; supported:"
          f" {', '.join(SUPPORTED_FAMILIES)}"
      )
    if type(self.vision) is not want:  # pylint: disable=unidiomatic-typecheck
      raise ValueError(
          f"family {self.family!r} needs a {want.__name__}, not a"
          f" {type(self.vision).__name__}"
      )

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def replace_text(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, text=self.text.replace(**kwargs))

  def replace_vision(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(
        self, vision=dataclasses.replace(self.vision, **kwargs)
    )

  @property
  def default_probe_layer(self) -> int:
    """EASE's default attention site, floor(2L/3)."""
    return (2 * self.text.num_hidden_layers) // 3

  # ---------------------------------------------------------------------
  # HF conversion.
  # ---------------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf_config: Any) -> "ModelConfig":
    """From a `transformers` config object (already normalised by it)."""
    family = getattr(hf_config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
      raise CheckpointError(
          f"unsupported model family {family!r} in config.json; supported:"
          f" {', '.join(SUPPORTED_FAMILIES)}"
      )
    t = hf_config.text_config
    v = hf_config.vision_config
    rope = dict(t.rope_parameters or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise CheckpointError(
          f"config.json: text rope_type {rope_type!r} is not supported"
          " (only the default M-RoPE)"
      )
    if getattr(t, "use_sliding_window", False):
      raise CheckpointError(
          "config.json: use_sliding_window=true is not supported (the"
          " released Qwen2.5-VL checkpoints do not use it)"
      )
    vrope = dict(getattr(v, "rope_parameters", None) or {})
    eos = getattr(t, "eos_token_id", None)
    if isinstance(eos, list):
      eos = tuple(eos)
    if family == "qwen3_vl":
      bias = bool(t.attention_bias)
      switches = dict(QWEN3_TEXT, qkv_bias=bias, o_bias=bias)
      head_dim = int(t.head_dim)
    else:
      switches, head_dim = _QWEN2_5_TEXT, None
    return cls(
        family=family,
        text=_from_fields(
            TextConfig,
            t,
            rms_norm_eps=float(t.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", 1000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            head_dim=head_dim,
            **switches,
        ),
        vision=_from_fields(
            _VISION_CLASSES[family],
            v,
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        ),
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        bos_token_id=getattr(t, "bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=getattr(t, "pad_token_id", None),
    )

  def to_hf(self):
    """The equivalent `transformers` config object."""
    from transformers import Qwen2_5_VLConfig  # pylint: disable=g-import-not-at-top
    from transformers import Qwen3VLConfig  # pylint: disable=g-import-not-at-top

    t, v = self.text, self.vision
    eos = (
        list(self.eos_token_id)
        if isinstance(self.eos_token_id, tuple)
        else (self.eos_token_id)
    )
    qwen3 = self.family == "qwen3_vl"
    switches = QWEN3_TEXT if qwen3 else _QWEN2_5_TEXT
    # Qwen3's one `attention_bias` covers q/k/v and o.
    fixed = (
        dict(qk_norm=True, mrope_interleaved=True, qkv_bias=t.o_bias)
        if qwen3
        else switches
    )
    wrong = {k: getattr(t, k) for k in fixed if getattr(t, k) != fixed[k]}
    if wrong or (not qwen3 and not t.derived_head_dim):
      raise ValueError(
          f"this {self.family} text config cannot be written as a"
          f" transformers config: {wrong or dict(head_dim=t.head_dim)}"
      )
    special = ("rope_theta", "mrope_section", "tie_word_embeddings",
               *switches, "head_dim")  # fmt: skip
    text = _to_fields(t, special)
    text["rope_parameters"] = dict(
        rope_type="default",
        rope_theta=t.rope_theta,
        mrope_section=list(t.mrope_section),
    )
    if qwen3:
      text.update(head_dim=t.head_dim, attention_bias=t.qkv_bias)
      text["rope_parameters"]["mrope_interleaved"] = True
    vision = _to_fields(v, ("rope_theta",))
    vision["rope_parameters"] = dict(rope_type="axial", rope_theta=v.rope_theta)
    ids = dict(bos_token_id=self.bos_token_id, eos_token_id=eos,
               pad_token_id=self.pad_token_id)  # fmt: skip
    kwargs = dict(
        text_config=dict(text, **ids),
        vision_config=vision,
        image_token_id=self.image_token_id,
        video_token_id=self.video_token_id,
        vision_start_token_id=self.vision_start_token_id,
        vision_end_token_id=self.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    if qwen3:
      return Qwen3VLConfig(**kwargs)
    return Qwen2_5_VLConfig(**kwargs, **ids)


def _from_fields(cls, src, **special):
  """`cls` from the same-named attributes of an HF config, plus `special`."""
  values = {}
  for f in dataclasses.fields(cls):
    if f.name in special or not hasattr(src, f.name):
      continue
    value = getattr(src, f.name)
    values[f.name] = tuple(value) if isinstance(value, list) else value
  return cls(**values, **special)


def _to_fields(cfg, skip) -> dict[str, Any]:
  """The dataclass's fields as an HF config dict (tuples as lists)."""
  return {
      f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v
      for f in dataclasses.fields(cfg)
      if f.name not in skip
  }


def read_config(hf_dir: str) -> ModelConfig:
  """Reads `hf_dir/config.json` into a `ModelConfig`, with clear errors."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not found (is this a HF model folder?)")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot be parsed as JSON: {e}") from e
  family = raw.get("model_type")
  if family == "qwen3_vl_moe":
    raise CheckpointError(
        f"{path}: model_type='qwen3_vl_moe' (Qwen3-VL MoE) is not supported"
        " yet; the dense Qwen3-VL sizes (2B-32B) are"
    )
  if family not in SUPPORTED_FAMILIES:
    raise CheckpointError(
        f"{path}: unsupported model family model_type={family!r}; supported:"
        f" {', '.join(SUPPORTED_FAMILIES)}"
    )
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top

  hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
  return ModelConfig.from_hf(hf_config)
