"""What a training run sets up: everything `train.train` composes.

Before any parameter exists: the model's architecture
(`model_config_for`), the processor (`make_processor`), the datasets
(`dataset_sources`), the chance level of the synthetic task
(`chance_accuracy`), and the held-out table printed at the end
(`results_table`). Then the stages (`stage_plan`), the parameters
(`init_params`), the train state's shapes and shardings
(`abstract_train_state`, `fresh_state`), the optimizer (`make_tx`), the
data iterators and their checkpointed positions, and each stage's learner
(`make_learner`, `enter_stage`). Each is importable on its own (the
notebooks, the benchmarks and `inference.py` use them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from faithful_rl import checkpointing
from faithful_rl import models
from faithful_rl import optim
from faithful_rl import rl
from faithful_rl import sft
from faithful_rl import sharding
from faithful_rl import steps
from faithful_rl.data import batching
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


# ---------------------------------------------------------------------------
# The run's pieces around the model: stages, parameters, state, data
# iterators, learners (what `train.train` composes).
# ---------------------------------------------------------------------------


class RunStopped(RuntimeError):
  """A stop with a clear message; the last good checkpoint is untouched."""


def init_distributed(config) -> None:
  """`jax.distributed.initialize` from `config.distributed` (if enabled)."""
  d = config.distributed
  if not d.enabled:
    return
  # Collectives between CPU processes (tests, CPU clusters); accelerators
  # use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes > 0:
    kwargs["num_processes"] = int(d.num_processes)
  if d.process_id >= 0:
    kwargs["process_id"] = int(d.process_id)
  jax.distributed.initialize(**kwargs)


def stage_plan(config) -> list[tuple[str, int, int]]:
  """[(stage, first global step, end global step)]."""
  plan, start = [], 0
  for name in config.stages:
    n = int(config[name].steps)
    plan.append((name, start, start + n))
    start += n
  return plan


def stage_at(plan, step: int) -> tuple[str, int, int]:
  for name, start, end in plan:
    if start <= step < end:
      return name, start, end
  return plan[-1] if plan else ("done", 0, 0)


def init_params(config, model_config, mesh):
  """(graphdef, params pure dict) placed on the mesh; shapes first."""
  dtype = jnp.dtype(config.model.dtype)
  options = model_options(config)
  if config.model.init == "hf":
    model = models.from_pretrained(
        config.model.hf_dir,
        dtype=dtype,
        sharding=sharding.param_sharding_fn(mesh),
        **options,
    )
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)
  create = lambda: nnx.split(
      models.create(model_config, dtype=dtype, seed=config.seed, **options)
  )
  graphdef, abstract = nnx.eval_shape(create)
  abstract = nnx.to_pure_dict(abstract)
  shardings = sharding.tree_shardings(abstract, mesh)
  params = jax.jit(
      lambda: nnx.to_pure_dict(create()[1]), out_shardings=shardings
  )()
  return graphdef, params


def abstract_train_state(params, tx, mesh):
  """ShapeDtypeStructs (with shardings) of TrainState, for restore, and
  the shardings."""
  abstract = jax.eval_shape(lambda p: steps.TrainState.create(p, tx), params)
  params_sh = sharding.tree_shardings(abstract.params, mesh)
  opt_sh = sharding.tree_shardings(abstract.opt_state, mesh)
  step_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = steps.TrainState(params_sh, opt_sh, step_sh)
  return checkpointing.abstract_like(abstract, shardings), shardings


def make_tx(config, stage: str, params, total: int):
  return optim.from_config(params, config[stage].optim, total)


def fresh_state(params, tx, shardings, step=None) -> steps.TrainState:
  """`TrainState.create` placed as `shardings` say (a stage's start)."""
  return jax.jit(
      lambda p, s: steps.TrainState.create(p, tx, s), out_shardings=shardings
  )(params, step)


def iterators(config, sources, processor, model_config, buckets):
  """This process's shares of the SFT batches and the RL prompts."""
  procs, index = jax.process_count(), jax.process_index()
  if config.sft.batch_size % procs:
    raise ValueError(
        f"sft.batch_size={config.sft.batch_size} does not split over"
        f" {procs} processes"
    )
  make = lambda batch_size, seed_offset: batching.BatchIterator(
      sources["train"],
      processor,
      batch_size=batch_size,
      model_config=model_config,
      buckets=buckets,
      seed=config.seed + seed_offset,
      on_overflow=config.data.on_overflow,
      truncate_response=True,
      num_threads=config.data.num_threads,
      shard=(index, procs),
  )
  return {
      "sft": batching.Prefetch(make(config.sft.batch_size // procs, 0)),
      "rl": make(config.rl.num_prompts // procs, 1),
  }


def iterator_states(iters) -> dict[str, list[dict]]:
  """Every process's iterator states, for process 0's JSON checkpoint."""
  keys = ("seed", "epoch", "position", "num_records", "skipped")
  out = {}
  for name, it in iters.items():
    s = it.get_state()
    row = np.asarray([[s[k] for k in keys] + list(s["shard"])], np.int64)
    rows = sharding.allgather(row)
    out[name] = [
        dict(zip(keys, map(int, r[:5])), shard=[int(r[5]), int(r[6])])
        for r in rows
    ]
  return out


def restore_iterators(iters, saved: dict) -> None:
  procs, index = jax.process_count(), jax.process_index()
  for name, it in iters.items():
    states = saved[name]
    if isinstance(states, dict):  # written by one process before lists
      states = [states]
    if len(states) != procs:
      raise RunStopped(
          f"the checkpoint was written by {len(states)} processes; this run"
          f" has {procs}. Resume with the same number of processes."
      )
    it.set_state(states[index])


def make_learner(stage, config, *, tx, shardings, graphdef, data, iters,
                 mesh, engine, first_step=0, saved=None,
                 hooks=()):  # fmt: skip
  """The stage's learner: `step(state, rng) -> (state, metrics)`.

  `first_step`: the global step it starts at; `saved`: what the learner
  kept in the checkpoint it resumes from (`Learner.saved()`), or None at
  the stage's start; `hooks`: SFT batch hooks (tests: `sft.nan_at`).
  """
  common = dict(graphdef=graphdef, tx=tx, mesh=mesh,
                state_shardings=shardings, saved=saved)  # fmt: skip
  if stage == "sft":
    return sft.Learner(config, batches=iters["sft"], first_step=first_step,
                       hooks=hooks, **common)  # fmt: skip
  return rl.Learner(
      config,
      processor=data["processor"],
      model_config=data["model_config"],
      buckets=data["buckets"],
      prompts=iters["rl"],
      engine=engine,
      **common,
  )


def enter_stage(stage, plan, config, state, mesh):
  """A stage starts with its own optimizer (fresh moments).

  Returns (tx, shardings, state with the fresh optimizer state).
  """
  _, start, end = next(p for p in plan if p[0] == stage)
  tx = make_tx(config, stage, state.params, end - start)
  _, shardings = abstract_train_state(state.params, tx, mesh)
  return tx, shardings, fresh_state(state.params, tx, shardings, state.step)
