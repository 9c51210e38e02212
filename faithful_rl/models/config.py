"""Model configs: frozen, hashable dataclasses read from HF `config.json`.

The dataclasses are static arguments of jitted functions, so every field is
an immutable Python value (ints, floats, strings, tuples).

`ModelConfig` is a family (`families.Family`, e.g. "qwen2_5_vl"), a
`TextConfig` and the family's vision config. The decoder is shared:
`TextConfig`'s switches (`qkv_bias`, `qk_norm`, `mrope_interleaved`, an
explicit `head_dim`) say which one it is. Each vision config lives in its
family's module (`qwen2_5_vl.VisionConfig`, `qwen3_vl.Qwen3VisionConfig`;
both are importable from here too) and shares `VisionGeometry`.

Both layouts of Qwen-VL `config.json` are read: the flat one of the
published Qwen2.5-VL checkpoints (text fields at top level, `rope_scaling`
with `mrope_section`) and the nested one of Qwen3-VL and `transformers>=5`
(`text_config`, `rope_parameters`). We normalise through `transformers`'
own config classes, so our reading of a checkpoint's config is theirs; the
family's `from_hf` / `to_hf` add what is its own, with the helpers here
(`text_from_hf`, `vision_from_hf`, `token_ids_from_hf`, `hf_kwargs`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

from faithful_rl.models import families


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read; the message names the file."""


class VisionGeometry:
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
  def rotary_dim(self) -> int:
    """Features of each head RoPE rotates (all of them here; Qwen3.5's
    text config rotates a fraction)."""
    return self.head_dim

  @property
  def linear_layers(self) -> tuple[int, ...]:
    """Layers whose token mixer is linear attention (none here; Qwen3.5's
    `hybrid.HybridTextConfig` has them)."""
    return ()

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole Qwen-VL model: family, text and vision configs, token ids.

  `vision=None` is the family's default vision config.
  """

  family: str = "qwen2_5_vl"
  text: TextConfig = TextConfig()
  vision: Any = None
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None

  def __post_init__(self):
    want = families.get(self.family).vision_config
    if self.vision is None:
      object.__setattr__(self, "vision", want())
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
  # HF conversion (the family's `from_hf` / `to_hf`).
  # ---------------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf_config: Any) -> "ModelConfig":
    """From a `transformers` config object (already normalised by it)."""
    name = getattr(hf_config, "model_type", None)
    family = families.find(name)
    if family is None:
      raise CheckpointError(
          f"unsupported model family {name!r} in config.json; supported:"
          f" {', '.join(families.names())}"
      )
    return family.from_hf(hf_config)

  def to_hf(self):
    """The equivalent `transformers` config object."""
    return families.get(self.family).to_hf(self)


# ---------------------------------------------------------------------------
# Helpers of the families' from_hf / to_hf.
# ---------------------------------------------------------------------------


def text_from_hf(
    t: Any,
    *,
    cls: type = TextConfig,
    default_section: tuple[int, ...] = (16, 24, 24),
    **special,
) -> TextConfig:
  """The shared reading of an HF text config (M-RoPE, no sliding window)
  into `cls`; `special`: the family's decoder switches (and head_dim);
  `default_section`: the family's M-RoPE sections when the config names
  none."""
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
  return _from_fields(
      cls,
      t,
      rms_norm_eps=float(t.rms_norm_eps),
      rope_theta=float(rope.get("rope_theta", 1000000.0)),
      mrope_section=tuple(rope.get("mrope_section", default_section)),
      **special,
  )


def vision_from_hf(cls: type, v: Any):
  """`cls` (a vision config) from an HF vision config."""
  vrope = dict(getattr(v, "rope_parameters", None) or {})
  return _from_fields(
      cls, v, rope_theta=float(vrope.get("rope_theta", 10000.0))
  )


def token_ids_from_hf(hf_config: Any) -> dict[str, Any]:
  """`ModelConfig`'s token-id fields from an HF config."""
  t = hf_config.text_config
  eos = getattr(t, "eos_token_id", None)
  return dict(
      image_token_id=hf_config.image_token_id,
      video_token_id=hf_config.video_token_id,
      vision_start_token_id=hf_config.vision_start_token_id,
      vision_end_token_id=hf_config.vision_end_token_id,
      bos_token_id=getattr(t, "bos_token_id", None),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=getattr(t, "pad_token_id", None),
  )


def check_switches(config: ModelConfig, fixed: dict[str, Any]) -> None:
  """Raises unless the text config's switches are `fixed` (what the
  family's transformers config can express)."""
  t = config.text
  wrong = {k: getattr(t, k) for k in fixed if getattr(t, k) != fixed[k]}
  if wrong:
    raise ValueError(
        f"this {config.family} text config cannot be written as a"
        f" transformers config: {wrong}"
    )


def hf_kwargs(config: ModelConfig, skip_text=()) -> dict[str, Any]:
  """The shared keyword arguments of a family's transformers config:
  text_config (every `TextConfig` field but the switches, `skip_text` and
  the RoPE ones, which go into `rope_parameters`), vision_config, token
  ids, tie_word_embeddings. The token ids are also under "ids"."""
  t, v = config.text, config.vision
  eos = config.eos_token_id
  eos = list(eos) if isinstance(eos, tuple) else eos
  skip = ("rope_theta", "mrope_section", "tie_word_embeddings", "head_dim",
          "qkv_bias", "o_bias", "qk_norm", "mrope_interleaved",
          *skip_text)  # fmt: skip
  text = _to_fields(t, skip)
  text["rope_parameters"] = dict(
      rope_type="default",
      rope_theta=t.rope_theta,
      mrope_section=list(t.mrope_section),
  )
  vision = _to_fields(v, ("rope_theta",))
  vision["rope_parameters"] = dict(rope_type="axial", rope_theta=v.rope_theta)
  ids = dict(bos_token_id=config.bos_token_id, eos_token_id=eos,
             pad_token_id=config.pad_token_id)  # fmt: skip
  return dict(
      text_config=dict(text, **ids),
      vision_config=vision,
      image_token_id=config.image_token_id,
      video_token_id=config.video_token_id,
      vision_start_token_id=config.vision_start_token_id,
      vision_end_token_id=config.vision_end_token_id,
      tie_word_embeddings=t.tie_word_embeddings,
      ids=ids,
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


def _is_run_config(raw: dict) -> bool:
  """Whether a config.json is a training run's (a workdir), not a model's."""
  return "model_type" not in raw and {"model", "stages"} <= set(raw)


def read_config(hf_dir: str) -> ModelConfig:
  """Reads `hf_dir/config.json` into a `ModelConfig`, with clear errors."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    hint = ""
    if os.path.isdir(os.path.join(hf_dir, "state")):
      hint = (
          " This looks like a training checkpoint (a workdir's"
          " checkpoints/<step>): export it with `python -m faithful_rl.export"
          " --workdir=<workdir> --step=<step> --out=DIR`."
      )
    raise CheckpointError(
        f"{path}: not found (is this a HF model folder?){hint}"
    )
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot be parsed as JSON: {e}") from e
  if _is_run_config(raw):
    raise CheckpointError(
        f"{path} is a training run's config (this is a workdir, not a HF"
        " model folder); export the run with `python -m faithful_rl.export"
        f" --workdir={hf_dir} --out=DIR`"
    )
  family = raw.get("model_type")
  if family == "qwen3_vl_moe":
    raise CheckpointError(
        f"{path}: model_type='qwen3_vl_moe' (Qwen3-VL MoE) is not supported"
        " yet; the dense Qwen3-VL sizes (2B-32B) are"
    )
  if families.find(family) is None:
    raise CheckpointError(
        f"{path}: unsupported model family model_type={family!r}; supported:"
        f" {', '.join(families.names())}"
    )
  from transformers import AutoConfig  # pylint: disable=g-import-not-at-top

  hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
  return ModelConfig.from_hf(hf_config)


# The family modules' names, importable from here as they always were.
_MOVED = {
    "VisionConfig": "faithful_rl.models.qwen2_5_vl",
    "Qwen3VisionConfig": "faithful_rl.models.qwen3_vl",
    "QWEN3_TEXT": "faithful_rl.models.qwen3_vl",
}


def __getattr__(name: str):
  if name in _MOVED:
    return getattr(importlib.import_module(_MOVED[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
