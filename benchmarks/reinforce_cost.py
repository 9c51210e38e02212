r"""Extra cost of Faithful-MR1's Reinforcing stage (and of VPPO's branch).

  python benchmarks/reinforce_cost.py [--steps 12]

Trains the demo model (from scratch; speed does not depend on the weights)
for a few RL steps with `python -m faithful_rl.train`, once as plain DAPO
and once per method, and compares the mean RL step time (rollout +
analysis + update, compile steps excluded) read from metrics.jsonl:
  faithful_mr1: + a probed forward (attention mass on the evidence) and a
                teacher-forced counterfactual forward (masked evidence);
  faithful_mr1 rollout_flip: + a counterfactual rollout instead;
  vppo:         + a forward on the patch-perturbed image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "dapo": ("configs/demo.py", []),
    "faithful_mr1 (logprob_drop)": (
        "configs/qwen2_5_vl_faithful_mr1.py:demo",
        [],
    ),
    "faithful_mr1 (rollout_flip)": (
        "configs/qwen2_5_vl_faithful_mr1.py:demo",
        ["--config.rl.reinforce.test=rollout_flip"],
    ),
    "vppo": ("configs/qwen2_5_vl_vppo.py:demo", []),
}
PHASES = ("time/sample", "time/analysis", "time/update")


def step_times(config, extra, steps, data_dir, workdir):
  cmd = [
      sys.executable, "-m", "faithful_rl.train", f"--config={config}",
      f"--workdir={workdir}", "--config.stages=('rl',)",
      f"--config.rl.steps={steps}", "--config.log_every=1",
      "--config.eval.every=0", "--config.eval.final_examples=0",
      "--config.eval.num_examples=8", "--config.eval.sampled=0",
      f"--config.data.data_dir={data_dir}",
      f"--config.ckpt.every={steps * 10}",
      # No dynamic sampling: every variant samples exactly one round.
      "--config.rl.dynamic_sampling=False",
  ] + extra  # fmt: skip
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if r["split"] == "train" and "time/update" in r]
  rows = rows[3:]  # compile steps
  return {p: float(np.mean([r[p] for r in rows])) for p in PHASES}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=12)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = os.path.join(tmp, "tfds")
    results = {}
    for name, (config, extra) in VARIANTS.items():
      results[name] = step_times(
          config,
          extra,
          args.steps,
          data_dir,
          os.path.join(tmp, str(len(results))),
      )
  base = sum(results["dapo"].values())
  print("RL step time on the demo model (CPU), 32 prompts x 8 samples")
  print(
      f"{'variant':30s} {'sample':>8s} {'analysis':>9s} {'update':>8s}"
      f" {'step s':>8s} {'vs dapo':>8s}"
  )
  for name, t in results.items():
    total = sum(t.values())
    print(
        f"{name:30s} {t['time/sample']:8.3f} {t['time/analysis']:9.3f}"
        f" {t['time/update']:8.3f} {total:8.3f} {total / base:7.2f}x"
    )


if __name__ == "__main__":
  main()
