"""Model families by name: what makes Qwen2.5-VL, Qwen3-VL, ... themselves.

A family is one module (`qwen2_5_vl.py`, `qwen3_vl.py`) that defines its
vision config, vision tower and model class, and registers them:

  FAMILY = families.register(families.Family(
      name="qwen2_5_vl",                      # config.json's model_type
      vision_config=VisionConfig,
      model_class=Qwen2_5_VL,
      from_hf=_from_hf,                       # transformers config -> ours
      to_hf=_to_hf,                           # ours -> transformers config
      roots={"visual": "visual", "language_model": "model",
             "lm_head": "lm_head"},           # our module -> HF prefix
      hf_architecture="Qwen2_5_VLForConditionalGeneration",
      hf_processor="Qwen2_5_VLProcessor",
      patch_buckets=(1024, 2048, 4096, 6144),
  ))

Everything that depends on the family reads it from here: `ModelConfig`
(its vision config class, reading and writing `config.json`),
`convert_hf` (the model class, tensor names, layouts), `models.create`,
`archs` and `run_setup`. `archs.py` imports every family module (its
tables hold their published sizes), so looking a family up loads them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

# The stacked modules every family has (parameters with a leading layer
# axis, one HF tensor per layer numbered after this path).
STACKED = (("language_model", "layers"), ("visual", "blocks"))


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family (see the module docstring).

  Attributes:
    name: the family's `model_type` in `config.json`.
    vision_config: its vision config class (a frozen dataclass).
    model_class: its model class, built as
      `model_class(config, dtype=, param_dtype=, remat=, attention=,
      scan_layers=, rngs=)`.
    from_hf: a `transformers` config object (normalised by transformers)
      -> `ModelConfig`.
    to_hf: `ModelConfig` -> the `transformers` config object.
    roots: our top-level module -> its prefix in the published HF names.
    hf_architecture: the `transformers` class `config.json` names under
      `architectures` (how transformers' Auto classes and vLLM pick it).
    hf_processor: its `transformers` processor class, written into the
      processor files of a model that has none (a run from scratch).
    patch_buckets: the recipes' patch-slot buckets for images of up to
      1,280 merged tokens.
    stacked: stacked modules besides `STACKED` (path pairs).
    layout: optional (path) -> `convert_hf.TensorLayout` or None, for
      tensors whose HF layout is not the generic one (a transposed kernel,
      the patch embedding).
    skip_hf: prefixes of published tensors that are not part of the model
      (Qwen3.5's multi-token-prediction head `mtp.`), skipped on loading
      as transformers skips them.
  """

  name: str
  vision_config: type
  model_class: type
  from_hf: Callable[[Any], Any]
  to_hf: Callable[[Any], Any]
  roots: Mapping[str, str]
  hf_architecture: str
  hf_processor: str
  patch_buckets: tuple[int, ...] = ()
  stacked: tuple[tuple[str, str], ...] = ()
  layout: Callable[[tuple], Any] | None = None
  skip_hf: tuple[str, ...] = ()


_REGISTRY: dict[str, Family] = {}
# Importing this module imports every family module.
_ALL_FAMILIES = "faithful_rl.models.archs"


def register(family: Family) -> Family:
  """Adds (or replaces: a re-run notebook cell) `family`; returns it."""
  _REGISTRY[family.name] = family
  return family


def _load():
  importlib.import_module(_ALL_FAMILIES)


def names() -> tuple[str, ...]:
  """The registered families' names."""
  _load()
  return tuple(sorted(_REGISTRY))


def find(name: str | None) -> Family | None:
  """The family named `name`, or None."""
  if name not in _REGISTRY:
    _load()
  return _REGISTRY.get(name)


def get(name: str | None) -> Family:
  """The family named `name`; a ValueError lists the known ones."""
  family = find(name)
  if family is None:
    raise ValueError(
        f"unknown model family {name!r}; supported: {', '.join(names())}"
    )
  return family


def stacked_paths() -> frozenset[tuple[str, str]]:
  """Every registered family's stacked modules."""
  _load()
  extra = (p for f in _REGISTRY.values() for p in f.stacked)
  return frozenset(STACKED) | frozenset(extra)
