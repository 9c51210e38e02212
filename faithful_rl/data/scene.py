"""Scenes of the synthetic task and their deterministic rendering.

A `Scene` holds every random choice of one example (drawn by
`synthetic.sample_scene`); `render` draws it with Pillow and no further
randomness. Object boxes are `[x0, y0, x1, y1)` pixels with exclusive ends,
the exact extent of the drawn pixels (Pillow's own coordinates are
inclusive, hence the -1s below).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from PIL import ImageDraw

# Seven-segment digits: a top, b upper right, c lower right, d bottom,
# e lower left, f upper left, g middle.
_SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}


@dataclasses.dataclass(frozen=True)
class Obj:
  """One drawn object: a shape (maybe holding a digit) or a chart bar."""

  kind: str  # a shape name or "bar"
  colour: str
  box: tuple[int, int, int, int]  # [x0, y0, x1, y1), pixels
  fill: tuple[int, int, int]
  digit: int | None = None


@dataclasses.dataclass(frozen=True)
class Scene:
  """Everything needed to render an example and state its question."""

  width: int
  height: int
  background: tuple[int, int, int]
  noise_seed: int
  noise: float
  objects: tuple[Obj, ...]
  family: str
  question: str
  answer: str
  answer_type: str
  evidence: tuple[int, ...]  # indices into `objects`
  reasoning: str
  chart: tuple[int, int, int, int, int] | None = None  # x0, y0, x1, base, unit
  # The SFT target when it differs from the truth (a biased demonstrator's
  # reasoning and answer); None: `reasoning` and `answer`.
  demonstration: tuple[str, str] | None = None

  @property
  def boxes(self) -> np.ndarray:
    """float32[n, 4] evidence boxes in pixels."""
    boxes = [self.objects[i].box for i in self.evidence]
    return np.asarray(boxes, np.float32).reshape(-1, 4)

  @property
  def box_labels(self) -> list[str]:
    out = []
    for i in self.evidence:
      o = self.objects[i]
      out.append(f"{o.colour} {o.kind}")
    return out

  @property
  def reference_response(self) -> str:
    reasoning, answer = self.demonstration or (self.reasoning, self.answer)
    boxed = f"\\boxed{{{answer}}}"
    return f"{reasoning} {boxed}" if reasoning else boxed


def _draw_digit(draw, box, digit: int, colour) -> None:
  x0, y0, x1, y1 = box
  s = x1 - x0
  dh, dw = int(round(0.55 * s)), int(round(0.32 * s))
  lw = max(2, s // 12)
  left = x0 + (s - dw) // 2
  top = y0 + (s - dh) // 2
  right, bottom = left + dw - 1, top + dh - 1
  mid = top + (dh - lw) // 2
  # Segments as filled rectangles (inclusive corners) inside the digit box.
  seg = {
      "a": (left, top, right, top + lw - 1),
      "b": (right - lw + 1, top, right, mid + lw - 1),
      "c": (right - lw + 1, mid, right, bottom),
      "d": (left, bottom - lw + 1, right, bottom),
      "e": (left, mid, left + lw - 1, bottom),
      "f": (left, top, left + lw - 1, mid + lw - 1),
      "g": (left, mid, right, mid + lw - 1),
  }
  for name in _SEGMENTS[digit]:
    draw.rectangle(seg[name], fill=colour)


def _draw_object(draw, obj: Obj) -> None:
  x0, y0, x1, y1 = obj.box
  xe, ye = x1 - 1, y1 - 1  # Pillow coordinates are inclusive
  cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
  if obj.kind == "circle":
    draw.ellipse((x0, y0, xe, ye), fill=obj.fill)
  elif obj.kind in ("square", "bar"):
    draw.rectangle((x0, y0, xe, ye), fill=obj.fill)
  elif obj.kind == "triangle":
    draw.polygon([(x0, ye), (xe, ye), (cx, y0)], fill=obj.fill)
  elif obj.kind == "diamond":
    draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=obj.fill)
  else:
    raise ValueError(f"unknown object kind {obj.kind!r}")
  if obj.digit is not None:
    luma = 0.299 * obj.fill[0] + 0.587 * obj.fill[1] + 0.114 * obj.fill[2]
    ink = (20, 20, 20) if luma > 150 else (255, 255, 255)
    _draw_digit(draw, obj.box, obj.digit, ink)


def render(scene: Scene) -> np.ndarray:
  """The scene's pixels: uint8[height, width, 3]."""
  img = np.empty((scene.height, scene.width, 3), np.uint8)
  img[...] = scene.background
  if scene.noise > 0:
    rng = np.random.default_rng(scene.noise_seed)
    noise = rng.normal(0.0, scene.noise, size=img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
  pil = Image.fromarray(img)
  draw = ImageDraw.Draw(pil)
  if scene.chart is not None:
    x0, top, x1, base, unit = scene.chart
    for y in range(base - unit, top - 1, -unit):
      draw.line((x0, y, x1 - 1, y), fill=(200, 200, 200))
  for obj in scene.objects:
    _draw_object(draw, obj)
  if scene.chart is not None:
    x0, top, x1, base, _ = scene.chart
    draw.line((x0 - 1, top, x0 - 1, base), fill=(40, 40, 40))
    draw.line((x0 - 1, base, x1 - 1, base), fill=(40, 40, 40))
  return np.asarray(pil)


def encode_png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()
