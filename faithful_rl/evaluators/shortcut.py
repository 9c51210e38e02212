r"""The prior-shortcut splits: accuracy in-prior and counter-prior, the gap.

For a run on the prior-shortcut variant of the synthetic task
(`config.data.synthetic.prior` > 0, see `faithful_rl.data.synthetic`):

  python -m faithful_rl.evaluators.shortcut --workdir=workdirs/prior
  python -m faithful_rl.evaluators.shortcut --workdir=workdirs/prior \
      --step=300 --num_examples=512 --sampled=4

loads the run's checkpoint (the latest, or --step) and answers the first
`num_examples` questions of each split with the evaluator of the trainer's
held-out table (`accuracy.evaluate`: greedy and sampled avg@k, the same
answer check, the run's own buckets and sampling temperature):

  test                answers uniform (the base task's test split)
  test_in_prior       the training distribution: the usual answer holds on
                      a `prior` share
  test_counter_prior  the usual answer never holds

Beside each it prints the question-only baseline (the majority training
answer of each question, fit on the run's train split) and chance, then the
shortcut gap: in-prior minus counter-prior accuracy. A model that reads the
image has no gap; the question-only baseline's gap is about `prior`.
Results go to `<workdir>/shortcut_<step>.json`.

The trainer can also put one of these splits in its own held-out table:
`--config.data.test_split=test_counter_prior`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
import ml_collections

from faithful_rl import rollout
from faithful_rl import run_setup
from faithful_rl.data import batching
from faithful_rl.data import synthetic
from faithful_rl.evaluators import accuracy

SPLITS = ("test", "test_in_prior", "test_counter_prior")


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def qa_from_source(source, num_examples: int | None = None) -> list:
  """(family, question, answer) of a built split's first records."""
  n = len(source) if num_examples is None else min(num_examples, len(source))
  out = []
  for i in range(n):
    r = source[i]
    out.append(tuple(_text(r[k]) for k in ("family", "question", "answer")))
  return out


def open_split(config, workdir: str, split: str):
  """(train source, `split` source) of the run's dataset."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.test_split = split
  sources = run_setup.dataset_sources(config, workdir)
  if sources["test"] is None:
    raise ValueError(f"the run's dataset has no split {split!r}")
  return sources["train"], sources["test"]


def evaluate_splits(
    model,
    processor,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    splits=SPLITS,
    num_examples: int = 512,
    sampled: int | None = None,
    num_train: int = 20000,
    engine: rollout.Engine | None = None,
    flips: bool = False,
) -> dict[str, Any]:
  """Accuracy, question-only baseline and chance on each split, and the gap.

  Args:
    model, processor, config: the run's (`inference.load_run`).
    workdir: the run's workdir (its dataset is built under it unless
      `config.data.data_dir` says otherwise).
    splits: split names; the gap needs test_in_prior and test_counter_prior.
    num_examples: questions per split (the first ones).
    sampled: answers per question for avg@k (None: the run's eval.sampled).
    num_train: training questions the question-only baseline is fit on.
    engine: the sampler (default: a new `rollout.Engine`).
    flips: also the evidence-mask flip rate (`accuracy.evaluate`).

  Returns:
    {split: {"accuracy", "sampled_accuracy", "question_only", "chance",
    ...}} and "gap": {"accuracy", "sampled_accuracy", "question_only"}
    (in-prior minus counter-prior), when both prior splits are given.
  """
  cfg = synthetic.config_from_dict(config.data.synthetic.to_dict())
  if not cfg.prior:
    raise ValueError(
        "the run's task has no prior (config.data.synthetic.prior is 0)"
    )
  buckets = batching.Buckets(
      prompt=config.data.prompt_buckets,
      patches=config.data.patch_buckets,
      response=config.data.response_buckets,
  )
  engine = engine or rollout.Engine(
      prompt_buckets=buckets.prompt, patch_buckets=buckets.patches
  )
  k = config.eval.get("sampled", 0) if sampled is None else sampled
  train_qa = None
  out: dict[str, Any] = {}
  for split in splits:
    train_source, source = open_split(config, workdir, split)
    if train_qa is None:
      train_qa = qa_from_source(train_source, num_train)
    ev = accuracy.evaluate(
        model,
        source,
        processor,
        engine=engine,
        max_new_tokens=int(config.rl.sampling.max_new_tokens),
        batch_size=config.eval.batch_size,
        buckets=buckets,
        num_examples=num_examples,
        probe_layers=tuple(config.rl.ease.layers),
        boxed_only=config.rl.get("boxed_only", False),
        sampled=k,
        temperature=config.rl.sampling.temperature,
        flips=flips,
    )
    ev.pop("samples")
    qo = synthetic.question_only_baseline(
        train_qa, qa_from_source(source, num_examples), cfg
    )
    ev["question_only"] = qo["accuracy"]
    ev["chance"] = qo["chance"]
    out[split] = ev
  if all(s in out for s in synthetic.PRIOR_SPLITS):
    inside, counter = (out[s] for s in synthetic.PRIOR_SPLITS)
    out["gap"] = {
        key: inside[key] - counter[key]
        for key in ("accuracy", "sampled_accuracy", "question_only")
        if key in inside
    }
  return out


def table(results: dict[str, Any]) -> str:
  """The printed table: one row per split, then the shortcut gap."""
  fmt = lambda x: "n/a" if x is None else f"{x:+.3f}" if x < 0 else f"{x:.3f}"
  head = f"{'split':20s} {'greedy':>7s} {'sampled':>8s} {'text only':>9s}"
  lines = [head + f" {'chance':>7s}", "-" * 55]
  rows = [(s, r) for s, r in results.items() if s != "gap"]
  if "gap" in results:
    rows.append(("gap (in - counter)", results["gap"]))
  for split, r in rows:
    lines.append(
        f"{split:20s} {fmt(r.get('accuracy')):>7s}"
        f" {fmt(r.get('sampled_accuracy')):>8s}"
        f" {fmt(r.get('question_only')):>9s}"
        f" {fmt(r.get('chance')):>7s}"
    )
  return "\n".join(lines)


def define_flags() -> None:
  """The command line's flags (defined only when run as a program). The
  run's loader imports `faithful_rl.train`, whose --workdir this reuses."""
  from faithful_rl import train  # pylint: disable=g-import-not-at-top,unused-import

  flags.DEFINE_integer("step", None, "Checkpoint step (default: the last).")
  flags.DEFINE_integer("num_examples", 512, "Questions per split.")
  flags.DEFINE_integer(
      "sampled", None, "Samples per question (default: the run's eval.sampled)."
  )
  flags.DEFINE_list("splits", list(SPLITS), "Splits to evaluate.")
  flags.DEFINE_bool(
      "flips", False, "Also the evidence-mask flip rate (a second greedy pass)."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from faithful_rl import inference  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir (the run's directory) is required")
  workdir = os.path.abspath(f.workdir)
  model, processor, config = inference.load_run(workdir, f.step)
  results = evaluate_splits(
      model,
      processor,
      config,
      workdir,
      splits=tuple(f.splits),
      num_examples=f.num_examples,
      sampled=f.sampled,
      flips=f.flips,
  )
  step = "last" if f.step is None else f.step
  path = os.path.join(workdir, f"shortcut_{step}.json")
  with open(path, "w") as fh:
    json.dump(results, fh, indent=2, default=float)
  print(table(results))
  print(f"[shortcut] {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
