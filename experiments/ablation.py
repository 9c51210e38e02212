r"""DAPO vs DAPO+EASE vs Faithful-MR1 vs VPPO on the synthetic task.

  python experiments/ablation.py --out=experiments/ablation --seeds=0,1,2
  python experiments/ablation.py --out=experiments/ablation --report_only

Demo scale (the tiny model on a CPU). Per seed, one SFT warm start is
shared by DAPO, DAPO+EASE and VPPO, and Faithful-MR1 gets its own
anchoring SFT (responses start with <Focus>; its attention row is anchored
to the evidence). Then every method runs its RL stage with the same budget
(steps, prompts, samples). Each run is `python -m faithful_rl.train`, so
every number here can be reproduced run by run.

Writes OUT/results.json (every run's held-out numbers), OUT/table.md (mean
and standard deviation over seeds) and OUT/ablation.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    # name: (config, SFT base)
    "dapo": ("configs/demo.py", "sft"),
    "dapo+ease": ("configs/qwen2_5_vl_ease.py:demo", "sft"),
    "vppo": ("configs/qwen2_5_vl_vppo.py:demo", "sft"),
    "faithful_mr1": ("configs/qwen2_5_vl_faithful_mr1.py:demo", "anchor"),
}
BASES = {
    "sft": "configs/demo.py",
    "anchor": "configs/qwen2_5_vl_faithful_mr1.py:demo",
}
METRICS = {
    # results key: column title
    "accuracy": "greedy accuracy",
    "sampled_accuracy": "sampled accuracy (T=1, avg@4)",
    "evidence_mass": "evidence mass",
    "pointing_hit": "pointing game",
    "accuracy/count": "count accuracy",
}


def run(config, workdir, overrides, log):
  cmd = [
      sys.executable, "-m", "faithful_rl.train", f"--config={config}",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in overrides.items()]  # fmt: skip
  print("$", " ".join(cmd), flush=True)
  with open(log, "a") as f:
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=f)
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def experiment(args):
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  results_path = os.path.join(out, "results.json")
  results = (
      json.load(open(results_path)) if os.path.exists(results_path) else {}
  )
  common = {"data.data_dir": os.path.join(out, "tfds")}
  common.update(dict(kv.split("=", 1) for kv in args.override))
  for seed in args.seeds:
    for base, config in BASES.items():
      wd = os.path.join(out, f"{base}_s{seed}")
      key = f"{base}/s{seed}"
      if key not in results:
        r = run(
            config,
            wd,
            {
                **common, "seed": seed, "stages": "('sft',)",
                "sft.steps": args.sft_steps,
            },
            os.path.join(out, "log.txt"),
        )  # fmt: skip
        results[key] = {"sft": r.get("sft"), "init": r.get("init")}
        json.dump(results, open(results_path, "w"), indent=1)
    for method, (config, base) in METHODS.items():
      key = f"{method}/s{seed}"
      if key in results:
        continue
      r = run(
          config,
          os.path.join(out, f"{method.replace('+', '_')}_s{seed}"),
          {
              **common, "seed": seed, "stages": "('rl',)",
              "rl.steps": args.rl_steps,
              "model.init_from": os.path.join(out, f"{base}_s{seed}"),
          },
          os.path.join(out, "log.txt"),
      )  # fmt: skip
      results[key] = {"after_sft": r.get("init"), "after_rl": r.get("rl")}
      json.dump(results, open(results_path, "w"), indent=1)
  return results


def _stat(values):
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, v.size


def report(out: str):
  """Mean ± sd over seeds of each metric after SFT, after RL and their
  per-seed difference (RL minus the same seed's SFT base)."""
  results = json.load(open(os.path.join(out, "results.json")))
  rows = []
  for method in METHODS:
    runs = [v for k, v in results.items() if k.startswith(method + "/s")]
    if not runs:
      continue
    row = {"method": method, "seeds": len(runs)}
    for m in METRICS:
      sft = [(r["after_sft"] or {}).get(m) for r in runs]
      rl = [(r["after_rl"] or {}).get(m) for r in runs]
      row[f"after_sft/{m}"] = _stat(sft)
      row[f"after_rl/{m}"] = _stat(rl)
      row[f"delta/{m}"] = _stat(
          [b - a for a, b in zip(sft, rl) if a is not None and b is not None]
      )
    rows.append(row)
  fmt = lambda s: f"{s[0]:.3f} ± {s[1]:.3f}"
  sign = lambda s: f"{s[0]:+.3f} ± {s[1]:.3f}"
  lines = []
  for title, cell in (
      ("After RL (mean ± sd over seeds)", lambda r, m: fmt(r[f"after_rl/{m}"])),
      (
          "RL minus its own SFT base, per seed",
          lambda r, m: sign(r[f"delta/{m}"]),
      ),
      ("The SFT bases", lambda r, m: fmt(r[f"after_sft/{m}"])),
  ):
    lines += [
        f"**{title}**",
        "",
        "| method | seeds | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for r in rows:
      cells = " | ".join(cell(r, m) for m in METRICS)
      lines.append(f"| {r['method']} | {r['seeds']} | {cells} |")
    lines.append("")
  table = "\n".join(lines)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  _plot(rows, os.path.join(out, "ablation.png"))
  return rows


def _plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metrics = list(METRICS)[:4]
  fig, axes = plt.subplots(1, len(metrics), figsize=(15, 3.4))
  names = [r["method"] for r in rows]
  x = np.arange(len(rows))
  for ax, m in zip(axes, metrics):
    for j, phase in enumerate(("after_sft", "after_rl")):
      mean = [r[f"{phase}/{m}"][0] for r in rows]
      std = [r[f"{phase}/{m}"][1] for r in rows]
      ax.bar(x + 0.38 * j, mean, 0.38, yerr=std, label=phase, capsize=3)
    ax.set_xticks(x + 0.19)
    ax.set_xticklabels(names, rotation=15, fontsize=8)
    ax.set_title(METRICS[m] + ", held-out", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--out", default=os.path.join(ROOT, "experiments/ablation")
  )
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--sft_steps", type=int, default=300)
  parser.add_argument("--rl_steps", type=int, default=80)
  parser.add_argument(
      "--override",
      action="append",
      default=[],
      help="extra key=value config overrides for every run",
  )
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  if not args.report_only:
    experiment(args)
  report(args.out)


if __name__ == "__main__":
  main()
