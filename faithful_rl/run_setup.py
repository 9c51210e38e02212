"""What a training run reads, before any parameter exists.

The model's architecture (`model_config_for`), the processor
(`make_processor`), the datasets (`dataset_sources`), the chance level of
the synthetic task (`chance_accuracy`), and the held-out table printed at
the end (`results_table`). `train.py` composes them; each is importable on
its own (the notebooks and `inference.py` use them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from faithful_rl import models
from faithful_rl.data import builders
from faithful_rl.data import processing
from faithful_rl.data import synthetic
from faithful_rl.data import tokenizer as tok_lib
from faithful_rl.models import archs
from faithful_rl.models import families
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig


def model_options(config) -> dict[str, Any]:
  """The model's construction options from `config.model`."""
  m = config.model
  return dict(
      param_dtype=jnp.dtype(m.get("param_dtype", m.dtype)),
      remat=m.get("remat", "none"),
      attention=m.get("attention", "auto"),
      scan_layers=m.get("scan_layers", True),
  )


def model_config_for(config, processor=None) -> ModelConfig:
  """The model's architecture, without loading any weights.

  From scratch: `config.model.scratch` holds the TextConfig and vision
  config fields (`text`, `vision`) and optionally the `family` (default
  qwen2_5_vl); the token ids are the tokenizer's.
  """
  m = config.model
  if m.init == "scratch":
    sc = m.scratch.to_dict() if hasattr(m.scratch, "to_dict") else m.scratch
    family = families.get(sc.get("family", "qwen2_5_vl"))
    text = dict(sc["text"])
    vision = dict(sc["vision"])
    for d in (text, vision):
      for k, v in d.items():
        if isinstance(v, list):
          d[k] = tuple(v)
    ids = tok_lib.special_token_ids(
        (processor.tokenizer if processor else _demo_tokenizer())
    )
    return ModelConfig(
        family=family.name,
        text=TextConfig(**text),
        vision=family.vision_config(**vision),
        **ids.model_config_kwargs(),
    )
  if m.hf_dir and os.path.exists(os.path.join(m.hf_dir, "config.json")):
    return models.read_config(m.hf_dir)
  if m.get("arch"):
    return archs.get(m.arch)
  raise ValueError(
      f"config.model.hf_dir={m.hf_dir!r} has no config.json (and no"
      " config.model.arch names a known architecture)"
  )


@functools.cache
def _demo_tokenizer():
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  return AutoTokenizer.from_pretrained(tok_lib.demo_tokenizer_dir())


def make_processor(config, model_config=None) -> processing.Processor:
  opts = config.data.processor.to_dict()
  path = (
      tok_lib.demo_tokenizer_dir()
      if config.model.init == "scratch"
      else config.model.hf_dir
  )
  return processing.processor_for(path, model_config=model_config, **opts)


def dataset_sources(config, workdir: str):
  """Builds (once) and opens the train / eval / test splits."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  name = config.data.name
  if name.startswith("evidence_vqa"):
    base = name.split("/", 1)[1] if "/" in name else "default"
    overrides = config.data.synthetic.to_dict()
    knobs = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in overrides.items()
        if k in {f.name for f in dataclasses.fields(synthetic.SyntheticConfig)}
    }
    split_sizes = {k: v for k, v in overrides.items() if k not in knobs}
    if overrides:
      digest = hashlib.sha1(
          json.dumps(overrides, sort_keys=True, default=str).encode()
      ).hexdigest()[:8]
      cfg_name = f"{base}_{digest}"
      builders.build_synthetic(
          data_dir,
          "default",
          name=cfg_name,
          synthetic=synthetic.SyntheticConfig(**knobs),
          **split_sizes,
      )
    else:
      cfg_name = base
      builders.build_synthetic(data_dir, base)
    full = f"evidence_vqa/{cfg_name}"
  elif name.startswith("jsonl_vqa/"):  # users' files, data.format
    files = config.data.files.to_dict()
    _, reports = builders.build_jsonl(
        files, data_dir, name=name.split("/")[1],
        format=config.data.get("format", "jsonl"),
    )  # fmt: skip
    for split, report in reports.items():
      print(f"[data] {split}: {report}")
    full = name
  else:
    full = name
  open_ = lambda split: builders.data_source(full, split, data_dir)
  sources = {"train": open_(config.data.train_split)}
  for key in ("eval", "test"):
    try:
      sources[key] = open_(config.data[f"{key}_split"])
    except Exception:  # pylint: disable=broad-except
      sources[key] = None
  return sources


def chance_accuracy(config, source) -> float | None:
  """Expected accuracy of uniform guessing (synthetic tasks only)."""
  if source is None or not config.data.name.startswith("evidence_vqa"):
    return None
  knobs = {
      k: tuple(v) if isinstance(v, list) else v
      for k, v in config.data.synthetic.to_dict().items()
      if k in {f.name for f in dataclasses.fields(synthetic.SyntheticConfig)}
  }
  cfg = synthetic.SyntheticConfig(**knobs)
  n = min(len(source), 2000)
  fams = [source[i]["family"] for i in range(n)]
  fams = [f.decode() if isinstance(f, bytes) else str(f) for f in fams]
  return float(np.mean([1.0 / cfg.num_answers(f) for f in fams]))


def results_table(results: dict, chance) -> str:
  """The run's held-out table: greedy and sampled accuracy per phase."""
  fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
  lines = [
      f"{'held-out accuracy':28s} {'greedy':8s} sampled (T=1, avg@k)",
      "-" * 60,
      f"{'chance (uniform guess)':28s} {fmt(chance):8s} {fmt(chance)}",
  ]
  phases = (
      ("init", "before training"),
      ("sft", "after SFT"),
      ("rl", "after RL"),
  )
  for key, label in phases:
    if key in results:
      r = results[key]
      lines.append(
          f"{label:28s} {fmt(r.get('accuracy')):8s}"
          f" {fmt(r.get('sampled_accuracy'))}"
      )
  for key, label in phases[1:]:
    r = results.get(key, {})
    if "evidence_mass" in r:
      lines.append(
          f"{'evidence mass / pointing':28s} {r['evidence_mass']:.3f} /"
          f" {r.get('pointing_hit', 0):.3f}  ({label})"
      )
  return "\n".join(lines)
