r"""`make demo` over seeds: its held-out table per seed, and the RL gain.

  python experiments/demo_seeds.py --seeds=0,1,2
  python experiments/demo_seeds.py --report_only   # the table again
  python experiments/demo_seeds.py --report_only --attention=0

Each seed runs the demo's own command with a seed and a workdir of its own,

  python -m faithful_rl.train --config=configs/demo.py \
      --workdir=workdirs/demo_seeds/s<seed> --config.seed=<seed>

(a finished seed is read back, an unfinished one resumes). Writes
experiments/demo_seeds.json: per seed the held-out results after SFT and
after RL (`results.json` of the run), the run's wall time, the load
average around it, the seconds its own metrics account for
(`metered_seconds`) and the commit; then prints greedy and sampled
accuracy after SFT and after RL per seed, with the mean and sd over seeds
of the RL - SFT difference.

`--attention=<seed>` draws experiments/demo_attention.png from that seed's
run: the same six counter-prior questions (the shape's usual colour is not
the one shown) answered after SFT (top) and after RL (bottom), each with
the response's attention over the 6 x 6 visual tokens and the evidence box.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "demo_seeds.json")


def command(seed: int, workdir: str) -> list[str]:
  return [
      sys.executable, "-m", "faithful_rl.train", "--config=configs/demo.py",
      f"--workdir={workdir}", f"--config.seed={seed}",
  ]  # fmt: skip


def metered_seconds(workdir: str) -> dict[str, float]:
  """Seconds the run's own metrics account for.

  "loop": the training loop, from the first step to the last logged one
  (log_every / steps_per_sec summed; it holds the held-out evaluation after
  SFT); "evals": the held-out evaluations before training and after RL.
  Startup, dataset building and compilation before the first step are in
  neither.
  """
  with open(os.path.join(workdir, "config.json")) as f:
    every = json.load(f)["log_every"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = [r for r in rows if r.get("split") == "train"]
  held_out = [r for r in rows if r.get("split") not in ("train", "eval")]
  last = max(r["step"] for r in held_out)
  return {
      "loop": sum(every / r["steps_per_sec"] for r in train),
      "evals": sum(r["time"] for r in held_out if r["step"] in (0, last)),
  }


def commit() -> str:
  return subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
  ).stdout.strip()


def run_seed(seed: int, root: str) -> dict:
  workdir = os.path.join(root, f"s{seed}")
  results = os.path.join(workdir, "results.json")
  cmd = command(seed, workdir)
  entry = {"command": " ".join(cmd[1:]), "commit": commit()}
  if not os.path.exists(results):
    print("$", " ".join(cmd), flush=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    entry["wall_seconds"] = time.perf_counter() - t0
    entry["load_before_after"] = [load, os.getloadavg()[0]]
  with open(results) as f:
    entry["results"] = json.load(f)
  entry["metered_seconds"] = metered_seconds(workdir)
  return entry


def report(runs: dict) -> str:
  rows = [
      (
          "| seed | greedy SFT | greedy RL | RL - SFT | sampled SFT | sampled"
          " RL | RL - SFT |"
      ),
      "|---|---|---|---|---|---|---|",
  ]
  deltas = {"accuracy": [], "sampled_accuracy": []}
  for seed, e in sorted(runs.items(), key=lambda kv: int(kv[0])):
    r = e["results"]
    cells = []
    for key in deltas:
      sft, rl = r["sft"][key], r["rl"][key]
      deltas[key].append(rl - sft)
      cells += [f"{sft:.3f}", f"{rl:.3f}", f"{rl - sft:+.3f}"]
    rows.append(f"| {seed} | " + " | ".join(cells) + " |")
  cells = []
  for key, d in deltas.items():
    sd = np.std(d, ddof=1) if len(d) > 1 else 0.0
    cells += ["", "", f"{np.mean(d):+.3f} ± {sd:.3f}"]
  rows.append("| mean ± sd | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def attention_picture(workdir: str, out_png: str, n: int = 6) -> str:
  """After SFT and after RL on `n` counter-prior questions (module doc)."""
  from faithful_rl import inference  # pylint: disable=g-import-not-at-top
  from faithful_rl import viz  # pylint: disable=g-import-not-at-top
  from faithful_rl.data import synthetic  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  config = inference.load_config(workdir)
  task = synthetic.config_from_dict(config.data.synthetic.to_dict())
  records = list(synthetic.generate(task, "test_counter_prior", n))
  sft_step = int(config.sft.steps)
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  rows = []
  for step in (sft_step, max(steps)):
    if step not in steps:
      raise ValueError(f"{workdir} has no checkpoint at step {step}: {steps}")
    model, processor, _ = inference.load_run(workdir, step)
    answers = inference.answer(model, processor, records, max_new_tokens=16)
    rows.append(viz.show_answers(answers))
  fig, axes = plt.subplots(2, 1, figsize=(3.4 * n, 8.4))
  for ax, panel, title in zip(axes, rows, ("after SFT", "after RL")):
    panel.canvas.draw()
    ax.imshow(np.asarray(panel.canvas.buffer_rgba()))
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  return out_png


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--root", default=os.path.join(ROOT, "workdirs/demo_seeds"))
  p.add_argument("--report_only", action="store_true")
  p.add_argument(
      "--attention", type=int, default=None, help="seed whose run to draw"
  )
  args = p.parse_args()
  runs = {}
  if os.path.exists(OUT):
    with open(OUT) as f:
      runs = json.load(f)
  if not args.report_only:
    for seed in (int(s) for s in args.seeds.split(",")):
      if str(seed) not in runs:
        runs[str(seed)] = run_seed(seed, args.root)
        with open(OUT, "w") as f:
          json.dump(runs, f, indent=2, default=float)
  print(report(runs))
  if args.attention is not None:
    png = os.path.join(ROOT, "experiments", "demo_attention.png")
    print(attention_picture(os.path.join(args.root, f"s{args.attention}"), png))


if __name__ == "__main__":
  main()
