r"""Trains a Qwen-VL policy: SFT / anchoring, then RL (GRPO, DAPO, VPPO, with
EASE and Faithful-MR1 terms), with evals, metrics, checkpoints and exact
resume.

  python -m faithful_rl.train --config=configs/demo.py --workdir=workdirs/demo
  python -m faithful_rl.train --config=configs/qwen2_5_vl_dapo.py:variant=7b,\
      hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/train.jsonl \
      --workdir=/runs/dapo7b --config.rl.steps=300

Rerunning the same command resumes from the workdir's last checkpoint and
continues exactly where the run stopped (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from flax import nnx
import tqdm

from faithful_rl import checkpointing
from faithful_rl import metrics as metrics_lib
from faithful_rl import models
from faithful_rl import optim
from faithful_rl import rl
from faithful_rl import rollout
from faithful_rl import sharding
from faithful_rl import steps
from faithful_rl.data import batching
from faithful_rl.data import builders
from faithful_rl.data import processing
from faithful_rl.data import synthetic
from faithful_rl.data import tokenizer as tok_lib
from faithful_rl.evaluators import accuracy
from faithful_rl.models import archs
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import VisionConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")


class RunStopped(RuntimeError):
  """A stop with a clear message; the last good checkpoint is untouched."""


# ---------------------------------------------------------------------------
# Pieces main() composes (each importable on its own).
# ---------------------------------------------------------------------------


def model_config_for(config, processor=None) -> ModelConfig:
  """The model's architecture, without loading any weights."""
  m = config.model
  if m.init == "scratch":
    sc = m.scratch.to_dict() if hasattr(m.scratch, "to_dict") else m.scratch
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
        text=TextConfig(**text),
        vision=VisionConfig(**vision),
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
  elif name.startswith("jsonl_vqa/"):
    files = config.data.jsonl.to_dict()
    _, reports = builders.build_jsonl(files, data_dir, name=name.split("/")[1])
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


def stage_plan(config) -> list[tuple[str, int, int]]:
  """[(stage, first global step, end global step)]."""
  plan, start = [], 0
  for name in config.stages:
    n = int(config[name].steps)
    plan.append((name, start, start + n))
    start += n
  return plan


def black_patch(processor) -> np.ndarray:
  """A black patch after normalisation, float32[patch_dim] (VPPO)."""
  ip = processor.image_processor
  mean = np.asarray(ip.image_mean, np.float32)
  std = np.asarray(ip.image_std, np.float32)
  per_channel = (0.0 - mean) / std
  return np.repeat(per_channel, processor.patch_dim // 3).astype(np.float32)


def model_options(config) -> dict[str, Any]:
  """The model's construction options from `config.model`."""
  m = config.model
  return dict(
      param_dtype=jnp.dtype(m.get("param_dtype", m.dtype)),
      remat=m.get("remat", "none"),
      attention=m.get("attention", "auto"),
      scan_layers=m.get("scan_layers", True),
  )


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


def abstract_train_state(graphdef, params, tx, mesh):
  """ShapeDtypeStructs (with shardings) of TrainState, for restore."""
  abstract = jax.eval_shape(
      lambda p: steps.TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)),
      params,
  )
  shardings = state_shardings(abstract, mesh)
  return checkpointing.abstract_like(abstract, shardings), shardings


def state_shardings(abstract_state, mesh):
  params_sh = sharding.tree_shardings(abstract_state.params, mesh)
  opt_sh = sharding.tree_shardings(abstract_state.opt_state, mesh)
  step_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return steps.TrainState(params_sh, opt_sh, step_sh)


def make_tx(config, stage: str, params, total: int):
  return optim.from_config(params, config[stage].optim, total)


def _results_table(results: dict, chance) -> str:
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
# main.
# ---------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole run in `workdir`; returns the results."""
  workdir = os.path.abspath(workdir)
  if config.distributed:
    jax.distributed.initialize()
  if config.debug.nan_at_step >= 0:
    os.environ.setdefault("FAITHFUL_RL_DEBUG", "1")

  # ------------------------------------------------------------ workdir --
  checkpointing.check_compatible(workdir, config.to_dict())

  # --------------------------------------------------------------- mesh --
  mesh = sharding.make_mesh(config.mesh.to_dict())
  put = functools.partial(sharding.put_batch, mesh)

  # --------------------------------------------------------------- data --
  processor0 = make_processor(config)
  model_config = model_config_for(config, processor0)
  processor = make_processor(config, model_config)
  sources = dataset_sources(config, workdir)
  buckets = batching.Buckets(
      prompt=config.data.prompt_buckets,
      patches=config.data.patch_buckets,
      response=config.data.response_buckets,
  )
  chance = chance_accuracy(config, sources.get("test") or sources.get("eval"))

  def iterator(batch_size, seed_offset):
    return batching.BatchIterator(
        sources["train"],
        processor,
        batch_size=batch_size,
        model_config=model_config,
        buckets=buckets,
        seed=config.seed + seed_offset,
        on_overflow=config.data.on_overflow,
        truncate_response=True,
        num_threads=config.data.num_threads,
    )

  iters = {
      "sft": batching.Prefetch(iterator(config.sft.batch_size, 0)),
      "rl": iterator(config.rl.num_prompts, 1),
  }

  # -------------------------------------------------- model, optimizer --
  graphdef, params = init_params(config, model_config, mesh)
  plan = stage_plan(config)
  total_steps = plan[-1][2] if plan else 0

  def stage_at(step):
    for name, start, end in plan:
      if start <= step < end:
        return name, start, end
    return plan[-1] if plan else ("done", 0, 0)

  # -------------------------------------------------------------- resume --
  ckpts = checkpointing.Checkpoints(
      workdir, keep=config.ckpt.keep, async_save=config.ckpt.async_save
  )
  latest = ckpts.latest_step()
  writer = metrics_lib.Writer(workdir, resume_step=latest)
  results: dict[str, Any] = {}
  step = 0 if latest is None else int(latest)
  stage, s_start, s_end = stage_at(step)
  tx = make_tx(config, stage, params, s_end - s_start) if plan else None
  abstract, shardings = abstract_train_state(graphdef, params, tx, mesh)
  if latest is None and config.model.get("init_from"):
    params = checkpointing.load_params(
        config.model.init_from,
        abstract.params,
        step=config.model.get("init_step", -1)
        if config.model.get("init_step", -1) >= 0
        else None,
    )
    print(f"[init] parameters from {config.model.init_from}")
  if latest is None:
    state = jax.jit(
        lambda p: steps.TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)),
        out_shardings=shardings,
    )(params)
  else:
    state, host = ckpts.restore(latest, abstract)
    for k, it in iters.items():
      it.set_state(host["data"][k])
    results = host.get("results", {})
    print(f"[resume] {workdir}: step {latest} ({stage})")
  del params

  # --------------------------------------------------------------- evals --
  engine = rollout.Engine(
      prompt_buckets=buckets.prompt, patch_buckets=buckets.patches
  )
  max_new = int(config.rl.sampling.max_new_tokens)

  def run_eval(split_key: str, n: int):
    source = sources.get(split_key)
    if source is None:
      return {}
    model = nnx.merge(graphdef, state.params)
    t0 = time.perf_counter()
    out = accuracy.evaluate(
        model,
        source,
        processor,
        engine=engine,
        max_new_tokens=max_new,
        batch_size=config.eval.batch_size,
        buckets=buckets,
        num_examples=n or None,
        probe_layers=tuple(config.rl.ease.layers),
        mesh=mesh,
        boxed_only=config.rl.get("boxed_only", False),
        sampled=config.eval.get("sampled", 0),
        temperature=config.rl.sampling.temperature,
    )
    out["time"] = time.perf_counter() - t0
    return out

  def save(step_: int):
    host = {
        "data": {k: it.get_state() for k, it in iters.items()},
        "results": results,
        "step": step_,
    }
    ckpts.save(step_, state, host)

  # ------------------------------------------------------------- update --
  def build_update(stage_name):
    if stage_name == "sft":
      cfg = steps.SFTConfig.from_config(config.sft)
      loss = steps.sft_loss
    else:
      cfg = steps.RLConfig.from_config(config.rl)
      loss = steps.rl_loss
    return cfg, steps.make_update(
        loss, tx, graphdef, cfg, state_shardings=shardings
    )

  stage_cfg, update = build_update(stage) if plan else (None, None)
  analyze = jax.jit(steps.analyze, static_argnums=(1, 4))
  ref_logprobs = jax.jit(steps.reference_logprobs, static_argnums=(1, 3))
  ref_holder = [None]  # frozen reference parameters (kl_beta > 0)
  base_rng = jax.random.key(config.seed)
  black = black_patch(processor)

  # --------------------------------------------------------------- loop --
  table_split = (
      ("test", config.eval.final_examples)
      if config.eval.final_examples and sources.get("test") is not None
      else ("eval", config.eval.num_examples)
  )
  if latest is None and "init" not in results:
    results["init"] = _eval_summary(run_eval(*table_split))
    writer.write(0, metrics_lib.scalars(results["init"]), split=table_split[0])
  bar = tqdm.tqdm(
      total=total_steps, initial=step, desc=stage, dynamic_ncols=True
  )
  t_last = time.perf_counter()

  def enter_stage(name, start, end):
    """A new stage starts with its own optimizer (fresh moments)."""
    nonlocal stage, tx, abstract, shardings, state, stage_cfg, update
    stage = name
    bar.set_description(stage)
    tx = make_tx(config, stage, state.params, end - start)
    abstract, shardings = abstract_train_state(graphdef, state.params, tx, mesh)
    state = jax.jit(
        lambda p, s: steps.TrainState(p, tx.init(p), s),
        out_shardings=shardings,
    )(state.params, state.step)
    stage_cfg, update = build_update(stage)

  while step < total_steps:
    name, s_start, s_end = stage_at(step)
    if name != stage:  # e.g. a stage of 0 steps was skipped
      enter_stage(name, s_start, s_end)
    rng = jax.random.fold_in(base_rng, step)
    t0 = time.perf_counter()
    if stage == "sft":
      batch = next(iters["sft"]).arrays
      if step == config.debug.nan_at_step:
        batch["vision"].pixel_values[:] = np.nan
      state, m = update(state, put(batch), rng)
      m = metrics_lib.scalars(jax.device_get(m))
      m["time/step"] = time.perf_counter() - t0
    else:
      state, m = rl.iteration(
          config,
          stage_cfg,
          state=state,
          graphdef=graphdef,
          update=update,
          analyze=analyze,
          ref_logprobs=ref_logprobs,
          ref_holder=ref_holder,
          prompts=iters["rl"],
          processor=processor,
          engine=engine,
          model_config=model_config,
          buckets=buckets,
          rng=rng,
          put=put,
          black=black,
          step=step,
      )
    loss = m.get("loss", 0.0)
    if not math.isfinite(loss):
      ckpts.wait()
      last = ckpts.latest_step()
      raise RunStopped(
          f"non-finite loss ({loss}) at step {step} ({stage}); stopping"
          " without saving. The last good checkpoint"
          f" ({'none' if last is None else f'step {last}'}) is untouched."
          " Lower the learning rate or check the data, then rerun."
      )
    step += 1
    bar.update(1)
    if step % config.log_every == 0 or step == s_end:
      m["stage_" + stage] = 1.0
      m["steps_per_sec"] = config.log_every / max(
          time.perf_counter() - t_last, 1e-9
      )
      t_last = time.perf_counter()
      writer.write(step, m, split="train")
      bar.set_postfix(
          {k: f"{m[k]:.3g}" for k in ("loss", "reward", "accuracy") if k in m}
      )
    boundary = step == s_end
    if boundary:  # held-out table entry: the test split, same examples
      results[stage] = _eval_summary(run_eval(*table_split))
      writer.write(
          step, metrics_lib.scalars(results[stage]), split=table_split[0]
      )
      tqdm.tqdm.write(
          f"[eval] after {stage} (step {step}):"
          f" accuracy {results[stage].get('accuracy', float('nan')):.3f}"
      )
    elif config.eval.every and step % config.eval.every == 0:
      ev = _eval_summary(run_eval("eval", config.eval.num_examples))
      writer.write(step, metrics_lib.scalars(ev), split="eval")
      tqdm.tqdm.write(
          f"[eval] step {step}: accuracy {ev.get('accuracy', float('nan')):.3f}"
      )
    kill_at = os.environ.get("FAITHFUL_RL_TEST_KILL_AT_STEP")
    if kill_at and int(kill_at) == step:  # test hook: die mid-training
      writer.flush()
      os.kill(os.getpid(), signal.SIGKILL)
    if boundary and step < total_steps:
      # Enter the next stage before saving, so that the boundary checkpoint
      # holds the state a resumed run continues from (its fresh optimizer).
      enter_stage(*stage_at(step))
    if boundary or step % config.ckpt.every == 0 or step == total_steps:
      save(step)
  bar.close()
  ckpts.wait()

  # -------------------------------------------------------------- final --
  for it in iters.values():
    it.close()
  writer.close()
  ckpts.close()
  summary = {"chance": chance, "table_split": table_split[0], **results}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  try:
    metrics_lib.plot_curves(writer.path, os.path.join(workdir, "curves.png"))
  except ValueError:
    pass
  print(_results_table(results, chance))
  return summary


def _eval_summary(ev: dict) -> dict:
  return {k: v for k, v in ev.items() if k != "samples"}


def _quiet():
  """Keeps the console to the progress bar, evals and the final table."""
  import logging  # pylint: disable=g-import-not-at-top

  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  tfds.disable_progress_bar()
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv):
  _quiet()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  try:
    train(config, workdir)
  except (
      RunStopped,
      checkpointing.IncompatibleWorkdir,
      metrics_lib.MetricsFileError,
      batching.BucketError,
      models.CheckpointError,
  ) as e:
    print(f"\n[faithful_rl] stopped: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
