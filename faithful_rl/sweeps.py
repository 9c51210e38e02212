"""Sweeps of one config value, run in-process, for notebooks.

  rows = sweeps.run(config, "rl.ease.weight", [0.0, 0.001, 0.1], root)
  sweeps.plot(rows, "rl.ease.weight")

Every value is one `train.train` run in `root/<key>=<value>` (resumed if
it is there already), so a sweep interrupted on Colab continues where it
stopped. `init_from` starts every run from the same parameters (e.g. one
shared SFT run), so that only the swept value differs.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import jax
import ml_collections


def runtime() -> str:
  """'tpu', 'gpu' or 'cpu', and how many devices."""
  return f"{jax.default_backend()} x {jax.device_count()}"


def set_path(config: ml_collections.ConfigDict, key: str, value: Any):
  node = config
  parts = key.split(".")
  for p in parts[:-1]:
    node = node[p]
  node[parts[-1]] = value


def run(
    config: ml_collections.ConfigDict,
    key: str,
    values: Sequence[Any],
    root: str,
    *,
    init_from: str = "",
) -> list[dict[str, Any]]:
  """Trains one run per value; returns [{value, accuracy, ...}]."""
  from faithful_rl import train  # pylint: disable=g-import-not-at-top

  rows = []
  for value in values:
    c = copy.deepcopy(config)
    set_path(c, key, value)
    if init_from:
      c.model.init_from = init_from
    workdir = os.path.join(root, f"{key}={value}")
    results = train.train(c, workdir)
    last = results.get(c.stages[-1], {})
    rows.append(
        dict(
            value=value,
            workdir=workdir,
            accuracy=last.get("accuracy"),
            evidence_mass=last.get("evidence_mass"),
            pointing_hit=last.get("pointing_hit"),
            start_accuracy=results.get("init", {}).get("accuracy"),
        )
    )
  return rows


def plot(rows: Sequence[dict[str, Any]], key: str, out_png: str | None = None):
  """Accuracy and evidence attention mass against the swept value."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = [str(r["value"]) for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(11, 3))
  for ax, metric in zip(axes, ("accuracy", "evidence_mass", "pointing_hit")):
    ys = [r[metric] if r[metric] is not None else float("nan") for r in rows]
    ax.plot(range(len(rows)), ys, marker="o")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels)
    ax.set_xlabel(key)
    ax.set_title(metric.replace("_", " ") + " (held-out)")
  fig.tight_layout()
  if out_png:
    fig.savefig(out_png, dpi=110)
  return fig
