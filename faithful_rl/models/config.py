"""Model configs: frozen, hashable dataclasses read from HF `config.json`.

The dataclasses are static arguments of jitted functions, so every field is
an immutable Python value (ints, floats, strings, tuples).

Both layouts of Qwen-VL `config.json` are read: the flat one of the
published checkpoints (text fields at top level, `rope_scaling` with
`mrope_section`) and the nested one `transformers>=5` writes
(`text_config`, `rope_parameters`). We normalise through `transformers`'
own config classes, so our reading of a checkpoint's config is theirs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_FAMILIES = ("qwen2_5_vl",)


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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
    """Side in pixels of one merged visual token (28 for Qwen2.5-VL)."""
    return self.patch_size * self.spatial_merge_size

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
class TextConfig:
  """Qwen2 decoder with grouped-query attention and M-RoPE."""

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

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole Qwen-VL model: family, text and vision configs, token ids."""

  family: str = "qwen2_5_vl"
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def replace_text(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(
        self, text=dataclasses.replace(self.text, **kwargs)
    )

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
    eos = t.eos_token_id
    if isinstance(eos, list):
      eos = tuple(eos)
    return cls(
        family=family,
        text=_from_fields(
            TextConfig,
            t,
            rms_norm_eps=float(t.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", 1000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        ),
        vision=_from_fields(
            VisionConfig,
            v,
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        ),
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=eos,
        pad_token_id=t.pad_token_id,
    )

  def to_hf(self):
    """The equivalent `transformers` config object."""
    from transformers import Qwen2_5_VLConfig  # pylint: disable=g-import-not-at-top

    t, v = self.text, self.vision
    eos = (
        list(self.eos_token_id)
        if isinstance(self.eos_token_id, tuple)
        else (self.eos_token_id)
    )
    special = ("rope_theta", "mrope_section", "tie_word_embeddings")
    text = _to_fields(t, special)
    text["rope_parameters"] = dict(
        rope_type="default",
        rope_theta=t.rope_theta,
        mrope_section=list(t.mrope_section),
    )
    vision = _to_fields(v, ("rope_theta",))
    vision["rope_parameters"] = dict(rope_type="axial", rope_theta=v.rope_theta)
    ids = dict(bos_token_id=self.bos_token_id, eos_token_id=eos,
               pad_token_id=self.pad_token_id)  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=dict(text, **ids),
        vision_config=vision,
        image_token_id=self.image_token_id,
        video_token_id=self.video_token_id,
        vision_start_token_id=self.vision_start_token_id,
        vision_end_token_id=self.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
        **ids,
    )


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
  if family not in SUPPORTED_FAMILIES:
    raise CheckpointError(
        f"{path}: unsupported model family model_type={family!r}; supported:"
        f" {', '.join(SUPPORTED_FAMILIES)}"
    )
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top

  hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
  return ModelConfig.from_hf(hf_config)
