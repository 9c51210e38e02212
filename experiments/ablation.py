r"""The papers' methods against DAPO on the prior-shortcut synthetic task.

  python experiments/demo_seeds.py --seeds=0,1,2   # the plain SFT bases
  python experiments/ablation.py --out=experiments/ablation --seeds=0,1,2 \
      --plain_base=workdirs/demo_seeds --sft_steps=200 --rl_steps=30
  python experiments/ablation.py --out=experiments/ablation --report_only

The same command resumes a partial grid: a finished run (its evaluation in
OUT/results.json) is skipped, a run that stopped part-way resumes from its
own checkpoint (`faithful_rl.train` does that), and a trained run without
its evaluation is only evaluated.

Demo scale (configs/demo.py: the tiny model on a CPU, colour questions
whose usual answer holds on half the training images, a demonstrator that
answers by that prior on half the others). Per seed:

* SFT bases: one plain SFT warm start, shared by DAPO, DAPO+EASE and VPPO
  (with --plain_base, the demo run's own SFT stage of that seed: the same
  config, so the same base the demo's DAPO stage starts from); one
  Faithful-MR1 Anchoring SFT per anchoring weight (responses open with
  `<Focus>`, whose attention row is pulled toward the evidence).
* RL runs, every one with the same budget (steps, prompts, samples, lr):
  DAPO; DAPO+EASE at lambda_attn 1e-3, 1e-2, 1e-1 and at 1e-3 without the
  reward gate; VPPO; DAPO from each Anchoring base (anchoring alone); DAPO
  plus Reinforcing (lambda 0.1) from the lambda-0.1 Anchoring base, with
  each causal test (logprob_drop, rollout_flip).
* Every run, SFT bases included, is then evaluated by
  `python -m faithful_rl.evaluators.shortcut --flips` on the test (answers
  uniform), test_in_prior and test_counter_prior splits: greedy and sampled
  accuracy, evidence mass, pointing game, KL(target || attention), the
  evidence-mask flip rate, the question-only baseline and the shortcut gap.

Writes OUT/results.json (every run's numbers), OUT/table.md (mean and sd
over seeds, and paired deltas against the same seed's DAPO run) and
OUT/ablation.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MR1 = "configs/qwen2_5_vl_faithful_mr1.py:demo"
EASE = "configs/qwen2_5_vl_ease.py:demo"
ANCHOR_WEIGHTS = ("0.01", "0.1", "1")

# name: (config, overrides) of each SFT base.
BASES = {"sft": ("configs/demo.py", {})}
BASES.update({
    f"anchor{w}": (MR1, {"sft.anchor.weight": w}) for w in ANCHOR_WEIGHTS
})  # fmt: skip

NO_REINFORCE = {"rl.reinforce.enabled": False}
# name: (config, SFT base, overrides) of each RL run.
METHODS = {
    "dapo": ("configs/demo.py", "sft", {}),
    "ease1e-3": (EASE, "sft", {"rl.ease.weight": "0.001"}),
    "ease1e-2": (EASE, "sft", {"rl.ease.weight": "0.01"}),
    "ease1e-1": (EASE, "sft", {"rl.ease.weight": "0.1"}),
    "ease1e-3_nogate": (
        EASE, "sft", {"rl.ease.weight": "0.001", "rl.ease.gate": False},
    ),  # fmt: skip
    "vppo": ("configs/qwen2_5_vl_vppo.py:demo", "sft", {}),
}
METHODS.update({
    f"anchor{w}": (MR1, f"anchor{w}", NO_REINFORCE) for w in ANCHOR_WEIGHTS
})  # fmt: skip
METHODS.update({
    f"anchor0.1+reinforce_{t}": (
        MR1, "anchor0.1", {"rl.reinforce.test": t, "rl.reinforce.lambda_attn": "0.1"},
    )  # fmt: skip
    for t in ("logprob_drop", "rollout_flip")
})

# The default run order: one run of each paper's method first, then the
# sweeps (a partial grid then still answers the main comparisons).
ORDER = (
    "dapo", "ease1e-3", "vppo", "anchor0.1",
    "anchor0.1+reinforce_logprob_drop", "ease1e-2", "ease1e-1",
    "ease1e-3_nogate", "anchor0.01", "anchor1",
    "anchor0.1+reinforce_rollout_flip",
)  # fmt: skip
assert sorted(ORDER) == sorted(METHODS)

# (split, metric): column title. "gap" is in-prior minus counter-prior.
ACCURACY = {
    ("test", "accuracy"): "greedy",
    ("test", "sampled_accuracy"): "sampled",
    ("test_in_prior", "accuracy"): "in-prior greedy",
    ("test_counter_prior", "accuracy"): "counter greedy",
    ("test_counter_prior", "sampled_accuracy"): "counter sampled",
    ("gap", "accuracy"): "gap greedy",
    ("gap", "sampled_accuracy"): "gap sampled",
}
EVIDENCE = {
    ("test", "evidence_mass"): "evidence mass",
    ("test", "pointing_hit"): "pointing game",
    ("test", "attn_kl"): "KL(target‖attn)",
    ("test", "evidence_flip"): "flip rate",
    ("test_counter_prior", "evidence_flip"): "counter flip rate",
}


def run(cmd, log):
  print("$", " ".join(cmd), flush=True)
  with open(log, "a") as f:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=f)


def train(config, workdir, overrides, log):
  run(
      [sys.executable, "-m", "faithful_rl.train", f"--config={config}",
       f"--workdir={workdir}"]
      + [f"--config.{k}={v}" for k, v in overrides.items()],
      log,
  )  # fmt: skip
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def evaluate(workdir, args, log, step=None):
  run(
      [sys.executable, "-m", "faithful_rl.evaluators.shortcut",
       f"--workdir={workdir}", f"--num_examples={args.eval_examples}",
       f"--sampled={args.sampled}", "--flips"]
      + ([] if step is None else [f"--step={step}"]),
      log,
  )  # fmt: skip
  name = f"shortcut_{'last' if step is None else step}.json"
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def experiment(args):
  """Runs whatever of the grid OUT/results.json does not hold yet."""
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  results = json.load(open(path)) if os.path.exists(path) else {}
  log = os.path.join(out, "log.txt")
  common = {
      "data.data_dir": os.path.join(out, "tfds"),
      # No evaluation inside training: the evaluator below measures every
      # run on all three splits.
      "data.eval_split": "none",
      "data.test_split": "none",
      "ckpt.every": 50,
  }
  common.update(dict(kv.split("=", 1) for kv in args.override))

  def save():
    with open(path, "w") as f:
      json.dump(results, f, indent=1)

  def one(key, config, workdir, overrides, step=None):
    entry = results.setdefault(key, {})
    if "eval" in entry:
      return
    try:
      if "train" not in entry and config:
        entry["train"] = train(config, workdir, {**common, **overrides}, log)
        save()
      entry["eval"] = evaluate(workdir, args, log, step)
    except subprocess.CalledProcessError as e:  # the log has the traceback
      print(f"[ablation] {key} FAILED ({e}); see {log}", flush=True)
      return
    save()
    print(f"[ablation] {key} done", flush=True)

  def base(name, seed):
    """The base's workdir and the step to start from (None: its last)."""
    if name == "sft" and args.plain_base:
      # The demo's own runs: their SFT stage is this base, exactly.
      workdir = os.path.join(os.path.abspath(args.plain_base), f"s{seed}")
      if not os.path.isdir(
          os.path.join(workdir, "checkpoints", str(args.sft_steps))
      ):
        raise FileNotFoundError(
            f"{workdir} has no SFT checkpoint at step {args.sft_steps}; run"
            f" experiments/demo_seeds.py --seeds={seed} first"
        )
      results.setdefault(f"sft/base/s{seed}", {"from": workdir})
      one(f"sft/base/s{seed}", None, workdir, {}, step=args.sft_steps)
      return workdir, args.sft_steps
    config, extra = BASES[name]
    one(
        f"{name}/base/s{seed}", config, os.path.join(out, f"{name}_s{seed}"),
        {**extra, "seed": seed, "stages": "('sft',)",
         "sft.steps": args.sft_steps},
    )  # fmt: skip
    return os.path.join(out, f"{name}_s{seed}"), None

  # Method-major: each finished method has all its seeds, in the order
  # --methods gives (the claims' main comparisons first by default).
  for method in args.methods:
    for seed in args.seeds:
      if "eval" in results.get(f"{method}/s{seed}", {}):
        continue  # done (its base need not exist here)
      config, base_name, extra = METHODS[method]
      init, init_step = base(base_name, seed)
      start = {"model.init_from": init}
      if init_step is not None:
        start["model.init_step"] = init_step
      one(
          f"{method}/s{seed}", config,
          os.path.join(out, f"rl_{method.replace('+', '_')}_s{seed}"),
          {**extra, **start, "seed": seed, "stages": "('rl',)",
           "rl.steps": args.rl_steps},
      )  # fmt: skip
  return results


def value(entry, split, metric):
  ev = (entry or {}).get("eval") or {}
  return (ev.get(split) or {}).get(metric)


def stat(values):
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, v.size


def summarise(results):
  """{name: {(split, metric): {"mean": (m, sd, n), "delta": (m, sd, n)}}}.

  "delta" is the paired difference to DAPO: the run minus DAPO's run of the
  same seed, over the seeds both have.
  """
  names = [f"{b}/base" for b in BASES] + list(METHODS)
  seeds = sorted({k.rsplit("/s", 1)[1] for k in results}, key=int)
  out = {}
  for name in names:
    runs = {s: results.get(f"{name}/s{s}") for s in seeds}
    runs = {s: r for s, r in runs.items() if r and "eval" in r}
    if not runs:
      continue
    row = {"seeds": len(runs)}
    for col in list(ACCURACY) + list(EVIDENCE):
      vals = {s: value(r, *col) for s, r in runs.items()}
      dapo = {s: value(results.get(f"dapo/s{s}"), *col) for s in runs}
      row[col] = {
          "mean": stat(vals.values()),
          "delta": stat([
              vals[s] - dapo[s] for s in runs
              if vals[s] is not None and dapo[s] is not None
          ]),  # fmt: skip
      }
    out[name] = row
  return out


def mean_sd(s, signed: bool) -> str:
  """mean ± sd; a single seed has no sd; no seed, a dash."""
  if s[2] == 0:
    return "–"
  mean = f"{s[0]:+.3f}" if signed else f"{s[0]:.3f}"
  return mean if s[2] == 1 else f"{mean} ± {s[1]:.3f}"


def table(summary) -> str:
  fmt = lambda s: mean_sd(s, False)
  sign = lambda s: mean_sd(s, True)
  lines = []
  for title, cols, kind, cell in (
      ("Accuracy (mean ± sd over seeds)", ACCURACY, "mean", fmt),
      ("Evidence alignment, test split (mean ± sd)", EVIDENCE, "mean", fmt),
      ("Accuracy minus DAPO's, paired by seed", ACCURACY, "delta", sign),
      ("Evidence alignment minus DAPO's, paired by seed", EVIDENCE, "delta",
       sign),
  ):  # fmt: skip
    lines += [
        f"**{title}**",
        "",
        "| run | seeds | " + " | ".join(cols.values()) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, row in summary.items():
      if kind == "delta" and (name == "dapo" or name.endswith("/base")):
        continue
      cells = " | ".join(cell(row[c][kind]) for c in cols)
      lines.append(f"| {name} | {row['seeds']} | {cells} |")
    lines.append("")
  return "\n".join(lines)


def report(out: str):
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  summary = summarise(results)
  text = table(summary)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  print(text)
  plot(summary, os.path.join(out, "ablation.png"))
  return summary


def plot(summary, path):
  """Paired deltas against DAPO (mean ± sd over seeds), one panel each."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cols = [
      ("test", "accuracy"), ("test", "sampled_accuracy"),
      ("gap", "accuracy"), ("test", "evidence_mass"), ("test", "attn_kl"),
      ("test", "evidence_flip"),
  ]  # fmt: skip
  names = [n for n in summary if n != "dapo" and not n.endswith("/base")]
  if not names:
    return
  titles = {**ACCURACY, **EVIDENCE}
  fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 4.2))
  y = np.arange(len(names))
  for ax, col in zip(axes, cols):
    mean = [summary[n][col]["delta"][0] for n in names]
    sd = [summary[n][col]["delta"][1] for n in names]
    ax.barh(y, mean, xerr=sd, capsize=2, color="tab:blue")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(names if ax is axes[0] else [], fontsize=7)
    ax.invert_yaxis()
    ax.set_title(titles[col] + " − DAPO", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--out", default=os.path.join(ROOT, "experiments/ablation")
  )
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument(
      "--methods", default=",".join(ORDER), help="RL runs, in order"
  )
  parser.add_argument("--sft_steps", type=int, default=200)
  parser.add_argument(
      "--plain_base",
      default="",
      help=(
          "start the plain-SFT methods from these demo runs (DIR/s<seed>,"
          " experiments/demo_seeds.py) at step --sft_steps instead of training"
          " a base"
      ),
  )
  parser.add_argument("--rl_steps", type=int, default=30)
  parser.add_argument("--eval_examples", type=int, default=256)
  parser.add_argument("--sampled", type=int, default=4)
  parser.add_argument(
      "--override",
      action="append",
      default=[],
      help="extra key=value config overrides for every training run",
  )
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  if not args.report_only:
    experiment(args)
  report(args.out)


if __name__ == "__main__":
  main()
