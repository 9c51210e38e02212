r"""Trains a Qwen-VL policy: SFT / anchoring, then RL (GRPO, DAPO, VPPO, with
EASE and Faithful-MR1 terms), with evals, metrics, checkpoints and exact
resume.

  python -m faithful_rl.train --config=configs/demo.py --workdir=workdirs/demo
  python -m faithful_rl.train --config=configs/qwen2_5_vl_dapo.py:variant=7b,\
      hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct,data=/data/train.jsonl \
      --workdir=/runs/dapo7b --config.rl.steps=300

Rerunning the same command resumes from the workdir's last checkpoint and
continues exactly where the run stopped (bitwise on CPU). SIGTERM (a
preempted job) finishes the current step, saves, prints where to resume
and exits 0. Several processes (`--config.distributed.enabled=True`, one
per host) run the same command; each reads its share of the data.
"""

from __future__ import annotations

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
import ml_collections
from ml_collections import config_flags
from flax import nnx
import tqdm

from faithful_rl import checkpointing
from faithful_rl import metrics as metrics_lib
from faithful_rl import models
from faithful_rl import rollout
from faithful_rl import sft
from faithful_rl import sharding
from faithful_rl.data import batching
from faithful_rl.evaluators import accuracy
from faithful_rl.run_setup import RunStopped
from faithful_rl.run_setup import abstract_train_state
from faithful_rl.run_setup import chance_accuracy
from faithful_rl.run_setup import dataset_sources
from faithful_rl.run_setup import enter_stage
from faithful_rl.run_setup import fresh_state
from faithful_rl.run_setup import init_distributed
from faithful_rl.run_setup import init_params
from faithful_rl.run_setup import iterator_states
from faithful_rl.run_setup import iterators
from faithful_rl.run_setup import make_learner
from faithful_rl.run_setup import make_processor
from faithful_rl.run_setup import make_tx
from faithful_rl.run_setup import model_config_for
from faithful_rl.run_setup import model_options
from faithful_rl.run_setup import restore_iterators
from faithful_rl.run_setup import results_table
from faithful_rl.run_setup import stage_at
from faithful_rl.run_setup import stage_plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")

# The setup lives in `run_setup`; these names stay importable from here.
__all__ = [
    "RunStopped",
    "abstract_train_state",
    "chance_accuracy",
    "dataset_sources",
    "init_params",
    "make_processor",
    "make_tx",
    "model_config_for",
    "model_options",
    "stage_plan",
    "train",
]


class Preemption:
  """Turns SIGTERM into a request to stop after the current step."""

  def __init__(self):
    self.requested = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook's worker)
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self) -> bool:
    return sharding.any_process(self.requested)

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate(state, config, graphdef, data, engine, mesh, split, n) -> dict:
  """Held-out greedy (and sampled) accuracy and attention diagnostics."""
  source = data["sources"].get(split)
  if source is None:
    return {}
  if jax.process_count() > 1:
    tqdm.tqdm.write("[eval] skipped: the evaluator runs on one process only")
    return {}
  t0 = time.perf_counter()
  out = accuracy.evaluate(
      nnx.merge(graphdef, state.params),
      source,
      data["processor"],
      engine=engine,
      max_new_tokens=int(config.rl.sampling.max_new_tokens),
      batch_size=config.eval.batch_size,
      buckets=data["buckets"],
      num_examples=n or None,
      probe_layers=tuple(config.rl.ease.layers),
      mesh=mesh,
      boxed_only=config.rl.get("boxed_only", False),
      sampled=config.eval.get("sampled", 0),
      temperature=config.rl.sampling.temperature,
  )
  out["time"] = time.perf_counter() - t0
  return {k: v for k, v in out.items() if k != "samples"}


def save(ckpts, step, state, iters, results, learner) -> None:
  """A checkpoint of everything a resumed run continues from."""
  host = {"data": iterator_states(iters), "results": results, "step": step}
  ckpts.save(step, state, host, **(learner.saved() if learner else {}))


# ---------------------------------------------------------------------------
# train.
# ---------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole run in `workdir`; returns the results."""
  workdir = os.path.abspath(workdir)
  init_distributed(config)
  lead = jax.process_index() == 0

  # ---------------------------------------------------- workdir, mesh --
  checkpointing.check_compatible(workdir, config.to_dict(), write=lead)
  mesh = sharding.make_mesh(config.mesh.to_dict())
  # Under the mesh, the model pins its activations to the batch axes
  # (`models.layers.shard_batch`).
  with jax.set_mesh(mesh):
    return _run(config, workdir, mesh, lead)


def _run(config, workdir: str, mesh, lead: bool) -> dict[str, Any]:
  """`train`'s body, on `mesh`."""
  # --------------------------------------------------------------- data --
  processor0 = make_processor(config)
  model_config = model_config_for(config, processor0)
  processor = make_processor(config, model_config)
  if not lead:  # process 0 builds the datasets, the others then open them
    sharding.barrier("datasets")
  sources = dataset_sources(config, workdir)
  if lead:
    sharding.barrier("datasets")
  buckets = batching.Buckets(
      prompt=config.data.prompt_buckets,
      patches=config.data.patch_buckets,
      response=config.data.response_buckets,
  )
  data = dict(sources=sources, processor=processor,
              model_config=model_config, buckets=buckets)  # fmt: skip
  chance = chance_accuracy(config, sources.get("test") or sources.get("eval"))
  iters = iterators(config, sources, processor, model_config, buckets)

  # -------------------------------------------------- model, optimizer --
  graphdef, params = init_params(config, model_config, mesh)
  plan = stage_plan(config)
  total_steps = plan[-1][2] if plan else 0

  # ------------------------------------------------------------- resume --
  ckpts = checkpointing.Checkpoints(
      workdir, keep=config.ckpt.keep, async_save=config.ckpt.async_save
  )
  latest = ckpts.latest_step()
  writer = (
      metrics_lib.Writer(workdir, resume_step=latest, wandb=config.wandb)
      if lead
      else metrics_lib.NullWriter()
  )
  results: dict[str, Any] = {}
  step = 0 if latest is None else int(latest)
  stage, s_start, s_end = stage_at(plan, step)
  tx = make_tx(config, stage, params, s_end - s_start) if plan else None
  abstract, shardings = abstract_train_state(params, tx, mesh)
  saved = None  # what the learner kept in the checkpoint resumed from
  if latest is None and config.model.get("init_from"):
    init_step = config.model.get("init_step", -1)
    params = checkpointing.load_params(
        config.model.init_from,
        abstract.params,
        step=init_step if init_step >= 0 else None,
    )
    print(f"[init] parameters from {config.model.init_from}")
  if latest is None:
    state = fresh_state(params, tx, shardings)
  else:
    state, host, ref = ckpts.restore(latest, abstract, ref=abstract.params)
    saved = None if ref is None else {"ref": ref}
    restore_iterators(iters, host["data"])
    results = host.get("results", {})
    print(f"[resume] {workdir}: step {latest} ({stage})")
  del params

  # ------------------------------------------------------------ learner --
  engine = rollout.Engine(
      prompt_buckets=buckets.prompt, patch_buckets=buckets.patches
  )
  hooks = []
  if config.debug.nan_at_step >= 0:
    hooks.append(sft.nan_at(config.debug.nan_at_step))
  learner_args = dict(graphdef=graphdef, data=data, iters=iters, mesh=mesh,
                      engine=engine, hooks=hooks)  # fmt: skip
  learner = None
  if plan:
    learner = make_learner(stage, config, tx=tx, shardings=shardings,
                           first_step=step, saved=saved,
                           **learner_args)  # fmt: skip
  base_rng = jax.random.key(config.seed)
  eval_args = (config, graphdef, data, engine, mesh)

  # --------------------------------------------------------------- loop --
  table_split = (
      ("test", config.eval.final_examples)
      if config.eval.final_examples and sources.get("test") is not None
      else ("eval", config.eval.num_examples)
  )
  if latest is None and "init" not in results:
    results["init"] = evaluate(state, *eval_args, *table_split)
    if results["init"]:
      writer.write(0, metrics_lib.scalars(results["init"]), table_split[0])
  bar = tqdm.tqdm(total=total_steps, initial=step, desc=stage,
                  dynamic_ncols=True, disable=not lead)  # fmt: skip
  t_last = time.perf_counter()
  preemption = Preemption()
  preempted = False
  try:
    while step < total_steps:
      _test_signal_hook(step)
      t0 = time.perf_counter()
      state, m = learner.step(state, jax.random.fold_in(base_rng, step))
      m["time/step"] = time.perf_counter() - t0
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
        results[stage] = evaluate(state, *eval_args, *table_split)
        if results[stage]:
          writer.write(
              step, metrics_lib.scalars(results[stage]), table_split[0]
          )
        if "accuracy" in results[stage]:
          acc = results[stage]["accuracy"]
          tqdm.tqdm.write(
              f"[eval] after {stage} (step {step}): accuracy {acc:.3f}"
          )
      elif config.eval.every and step % config.eval.every == 0:
        ev = evaluate(state, *eval_args, "eval", config.eval.num_examples)
        if ev:
          writer.write(step, metrics_lib.scalars(ev), split="eval")
        if "accuracy" in ev:
          tqdm.tqdm.write(f"[eval] step {step}: accuracy {ev['accuracy']:.3f}")
      if boundary and step < total_steps:
        # The next stage starts before the boundary checkpoint, so that it
        # holds the state a resumed run continues from (its fresh optimizer).
        stage, s_start, s_end = stage_at(plan, step)
        bar.set_description(stage)
        tx, shardings, state = enter_stage(stage, plan, config, state, mesh)
        learner = make_learner(stage, config, tx=tx, shardings=shardings,
                               first_step=step, **learner_args)  # fmt: skip
      preempted = preemption.should_stop() and step < total_steps
      if (
          boundary
          or step % config.ckpt.every == 0
          or step == total_steps
          or preempted
      ):
        save(ckpts, step, state, iters, results, learner)
      _test_kill_hook(step, writer, ckpts)
      if preempted:
        break
  finally:  # a notebook keeps its own SIGTERM handling
    preemption.close()
  bar.close()
  ckpts.wait()

  # -------------------------------------------------------------- final --
  for it in iters.values():
    it.close()
  writer.close()
  ckpts.close()
  if preempted:
    print(
        f"[preempted] stopped after step {step} of {total_steps}; saved"
        f" {ckpts.directory}/{step}; rerun the same command to resume."
    )
    return {"preempted": step, **results}
  summary = {"chance": chance, "table_split": table_split[0], **results}
  if lead:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    try:
      metrics_lib.plot_curves(writer.path, os.path.join(workdir, "curves.png"))
    except ValueError:
      pass
    print(results_table(results, chance))
  return summary


def _test_signal_hook(step: int) -> None:
  """Test hook: a real SIGTERM to this process just before `step` runs."""
  at = os.environ.get("FAITHFUL_RL_TEST_SIGTERM_AT_STEP")
  if at and int(at) == step and jax.process_index() == 0:
    os.kill(os.getpid(), signal.SIGTERM)


def _test_kill_hook(step: int, writer, ckpts) -> None:
  """Test hook: SIGKILL (no cleanup) once `step` is logged and saved."""
  at = os.environ.get("FAITHFUL_RL_TEST_KILL_AT_STEP")
  if at and int(at) == step:
    writer.flush()
    ckpts.wait()
    os.kill(os.getpid(), signal.SIGKILL)


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
