"""Metrics to a JSONL file, TensorBoard, W&B and the console; curves.

`metrics.jsonl` has one JSON object per line, {"step": s, "split": ...,
name: value, ...}, each written with a single `write` on an O_APPEND
descriptor so that a killed run never leaves half a line. On resume the
file is validated (a line that does not parse is an error naming the file
and line, and the run stops before writing anything) and lines past the
restored step are dropped, so the file then continues exactly as an
uninterrupted run's.

Weights & Biases is optional: with a project named (`config.wandb.project`)
the `wandb` package is imported (an error says to install it if it is
missing) and every row is logged there too; the run id is kept in the
workdir, so a resumed run continues the same W&B run. With several
processes only process 0 writes (the others get a `NullWriter`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


class MetricsFileError(RuntimeError):
  """metrics.jsonl cannot be parsed."""


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics file; MetricsFileError on a bad line."""
  rows = []
  with open(path, "rb") as f:
    for i, raw in enumerate(f, 1):
      try:
        row = json.loads(raw.decode("utf-8"))
        if not isinstance(row, dict) or "step" not in row:
          raise ValueError("not an object with a 'step'")
      except (UnicodeDecodeError, ValueError) as e:
        raise MetricsFileError(
            f"{path}:{i}: corrupted metrics line ({e}); fix or move the file"
            " away to resume this run"
        ) from e
      rows.append(row)
  return rows


def scalars(m: dict) -> dict[str, float]:
  """The 0-d entries of a metrics dict, as Python floats."""
  out = {}
  for k, v in m.items():
    if np.ndim(v) == 0:
      out[k] = float(v)
  return out


def _clean(value):
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class NullWriter:
  """A Writer that writes nothing (processes other than 0)."""

  path = None

  def write(self, step, scalars, split="train"):
    del step, scalars, split

  def flush(self):
    pass

  def close(self):
    pass


def _wandb_run(workdir: str, opts: Mapping[str, Any], resume_step):
  """A W&B run for this workdir (resumed by id), or None without a project."""
  opts = dict(opts or {})
  if not opts.get("project"):
    return None
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"config.wandb.project={opts['project']!r} needs the wandb package:"
        " pip install wandb (or leave the project empty)"
    ) from e
  id_path = os.path.join(workdir, "wandb_id")
  run_id = None
  if resume_step is not None and os.path.exists(id_path):
    run_id = open(id_path).read().strip() or None
  run = wandb.init(
      project=opts["project"],
      entity=opts.get("entity") or None,
      name=opts.get("name") or None,
      mode=opts.get("mode") or None,
      dir=workdir,
      id=run_id,
      resume="allow" if run_id else None,
  )
  with open(id_path, "w") as f:
    f.write(str(run.id))
  return run


class Writer:
  """Writes scalars to workdir/metrics.jsonl, TensorBoard and W&B."""

  def __init__(
      self,
      workdir: str,
      *,
      resume_step: int | None = None,
      tensorboard: bool = True,
      wandb: Mapping[str, Any] | None = None,
  ):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      rows = read_jsonl(self.path)  # validate before anything is written
      keep = [
          r
          for r in rows
          if resume_step is not None and r["step"] <= resume_step
      ]
      if len(keep) != len(rows):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
          for r in keep:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None
    self._wandb = _wandb_run(workdir, wandb, resume_step)

  def write(self, step: int, scalars: Mapping[str, Any], split: str = "train"):
    row = {"step": int(step), "split": split}
    row.update({k: _clean(v) for k, v in scalars.items()})
    os.write(self._fd, (json.dumps(row, sort_keys=True) + "\n").encode())
    numbers = {
        f"{split}/{k}": v
        for k, v in row.items()
        if k not in ("step", "split") and isinstance(v, (int, float))
    }
    if self._tb is not None:
      for k, v in numbers.items():
        self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(numbers, step=int(step))

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    os.close(self._fd)
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def plot_curves(path: str, out_png: str, keys=None) -> str:
  """Learning curves (one panel per metric, train and eval) to a PNG."""
  # A figure on its own Agg canvas: never touches pyplot's global backend
  # (notebooks keep showing their inline figures after a training run).
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  rows = read_jsonl(path)
  keys = keys or ("reward", "accuracy", "loss", "response_length", "entropy")
  panels = [
      k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)
  ]
  if not panels:
    raise ValueError(f"{path}: none of {keys} was logged")
  fig = Figure(figsize=(4 * len(panels), 3))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)
  for ax, key in zip(axes[0], panels):
    for split in sorted({r.get("split", "train") for r in rows}):
      pts = [
          (r["step"], r[key])
          for r in rows
          if r.get("split", "train") == split
          and isinstance(r.get(key), (int, float))
      ]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, label=split)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  return out_png
