"""Pictures: attention heatmaps over the image, with the evidence boxes."""

from __future__ import annotations

import textwrap

from typing import Any, Sequence

import numpy as np


def _plt():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def heatmap_on_image(ax, image, attention: np.ndarray, boxes=(), alpha=0.55):
  """Draws `image`, the token-grid `attention` over it, and `boxes`.

  Args:
    ax: a matplotlib axis.
    image: PIL image or uint8[H, W, 3] (the original image).
    attention: float[h, w] over the merged-token grid (any scale).
    boxes: [n, 4] (x0, y0, x1, y1) in the original image's pixels.
    alpha: heatmap opacity.
  """
  from matplotlib import patches  # pylint: disable=g-import-not-at-top

  img = np.asarray(image)
  height, width = img.shape[:2]
  ax.imshow(img)
  att = np.asarray(attention, np.float32)
  if att.max() > 0:
    att = att / att.max()
  ax.imshow(
      att,
      cmap="inferno",
      alpha=alpha,
      extent=(0, width, height, 0),
      interpolation="nearest",
  )
  for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
    ax.add_patch(
        patches.Rectangle(
            (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", lw=2
        )
    )
  ax.set_xticks([])
  ax.set_yticks([])


def show_answers(answers: Sequence[dict[str, Any]], out_png: str | None = None):
  """One panel per `inference.answer` result: question, answer, heatmap."""
  plt = _plt()
  n = len(answers)
  fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 4.0), squeeze=False)
  for ax, a in zip(axes[0], answers):
    heatmap_on_image(ax, a["image"], a["attention"], a["boxes"])
    mark = "ok" if a["correct"] else "wrong"
    response = textwrap.wrap(f"-> {a['response']} ({mark})", 50)
    if len(response) > 2:  # keep the end: the boxed answer and the mark
      response = ["... " + " ".join(response[-2:])[-40:]]
    ax.set_title("\n".join([a["question"]] + response), fontsize=7)
  fig.tight_layout()
  if out_png:
    fig.savefig(out_png, dpi=110)
  return fig
