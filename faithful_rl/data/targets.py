"""Evidence boxes -> targets over the merged visual-token grid (numpy).

Coordinates. A box is `[x0, y0, x1, y1]` in original-image pixels with
x0 < x1 and y0 < y1 (continuous coordinates: a box covering pixel columns
10..29 is x0=10, x1=30), or normalized to [0, 1] of the image's width and
height. The processor resizes an image of (h, w) pixels to (H, W), both
multiples of the token side `s = patch_size * spatial_merge_size` (28 px
for Qwen2.5-VL); the merged-token grid is then (H / s) x (W / s), token
(row, col) covers pixels [col*s, (col+1)*s) x [row*s, (row+1)*s) of the
resized image, and its index in the image's run of visual tokens is
`row * grid_w + col` (row-major, the order of `<|image_pad|>` tokens).
`boxes_to_tokens` maps boxes to token units: x * (W / w) / s.

Coverage rule. A token is covered by a box when the box overlaps the
token's cell with positive area: col in [floor(x0), ceil(x1)) and row in
[floor(y0), ceil(y1)) in token units (a box edge lying exactly on a cell
edge does not cover the neighbouring cell). A tolerance of 1e-6 token
absorbs floating-point error in the resize scaling.

Axis alphabet: n boxes, N = grid_h * grid_w tokens of one image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageFilter

_EPS = 1e-6


class BoxError(ValueError):
  """A zero-area, inverted, non-finite or wholly outside box."""


def _record(record_id) -> str:
  return f"record {record_id!r}: " if record_id is not None else ""


def is_normalized(boxes: np.ndarray) -> bool:
  """True when every coordinate lies in [0, 1] (boxes given as fractions)."""
  boxes = np.asarray(boxes, np.float64)
  return boxes.size > 0 and bool(np.all((boxes >= 0.0) & (boxes <= 1.0)))


def clip_boxes(
    boxes: np.ndarray,
    width: float,
    height: float,
    *,
    record_id=None,
) -> tuple[np.ndarray, int]:
  """Validates pixel boxes and clips them to the image.

  Args:
    boxes: float[n, 4] pixel boxes [x0, y0, x1, y1].
    width: image width in pixels.
    height: image height in pixels.
    record_id: named in error messages.

  Returns:
    float64[n, 4] clipped boxes and the number of boxes that were clipped
    (partly outside the image).

  Raises:
    BoxError: a box is not finite, has zero area or is inverted (x1 <= x0
      or y1 <= y0), or lies wholly outside the image.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  for i, (x0, y0, x1, y1) in enumerate(boxes):
    if not np.all(np.isfinite([x0, y0, x1, y1])):
      raise BoxError(f"{_record(record_id)}box {i} is not finite: {boxes[i]}")
    if x1 <= x0 or y1 <= y0:
      kind = "zero-area" if x1 == x0 or y1 == y0 else "inverted"
      raise BoxError(
          f"{_record(record_id)}box {i} {boxes[i].tolist()} is {kind}"
          " (needs x0 < x1 and y0 < y1)"
      )
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
      raise BoxError(
          f"{_record(record_id)}box {i} {boxes[i].tolist()} lies outside the"
          f" {width:g}x{height:g} image"
      )
  clipped = boxes.copy()
  clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0.0, width)
  clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0.0, height)
  num_clipped = int(np.any(clipped != boxes, axis=1).sum())
  return clipped, num_clipped


def boxes_to_tokens(
    boxes: np.ndarray,
    image_size: tuple[int, int],
    resized_size: tuple[int, int],
    token_pixels: int = 28,
    *,
    normalized: bool | None = None,
    record_id=None,
) -> tuple[np.ndarray, int]:
  """Original-image boxes -> boxes in merged-token units of the resized image.

  Args:
    boxes: float[n, 4] [x0, y0, x1, y1] in original pixels, or in [0, 1].
    image_size: (height, width) of the original image.
    resized_size: (H, W) after the processor's resize (multiples of
      `token_pixels`).
    token_pixels: side of one merged token (patch_size * merge_size).
    normalized: whether boxes are fractions of the image size; None: they
      are when every coordinate lies in [0, 1].
    record_id: named in error messages.

  Returns:
    float32[n, 4] boxes in token units (token (r, c) spans [c, c+1) x
    [r, r+1)) and the number of boxes clipped to the image.
  """
  h, w = image_size
  rh, rw = resized_size
  if rh % token_pixels or rw % token_pixels:
    raise ValueError(
        f"resized size {resized_size} is not a multiple of {token_pixels}"
    )
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if normalized is None:
    normalized = is_normalized(boxes)
  if normalized:
    boxes = boxes * np.array([w, h, w, h], np.float64)
  boxes, num_clipped = clip_boxes(boxes, w, h, record_id=record_id)
  # Multiply before dividing so integer boxes on token edges stay exact.
  scaled = boxes * np.array([rw, rh, rw, rh], np.float64)
  scaled /= np.array([w, h, w, h], np.float64)
  return (scaled / token_pixels).astype(np.float32), num_clipped


def token_index(row, col, grid_w: int):
  """Row-major index of merged token (row, col)."""
  return np.asarray(row) * grid_w + np.asarray(col)


def _cell_range(lo: float, hi: float, n: int) -> tuple[int, int]:
  first = max(0, math.floor(lo + _EPS))
  last = min(n, math.ceil(hi - _EPS))
  return first, last


def evidence_token_mask(
    boxes_tok: np.ndarray, grid_h: int, grid_w: int
) -> np.ndarray:
  """Tokens covered by any box (see the coverage rule): bool[N]."""
  mask = np.zeros((grid_h, grid_w), bool)
  for x0, y0, x1, y1 in np.asarray(boxes_tok, np.float64).reshape(-1, 4):
    c0, c1 = _cell_range(x0, x1, grid_w)
    r0, r1 = _cell_range(y0, y1, grid_h)
    mask[r0:r1, c0:c1] = True
  return mask.reshape(-1)


def _smooth(dist: np.ndarray, alpha: float) -> np.ndarray:
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha} not in [0, 1]")
  n = dist.size
  out = (1.0 - alpha) * dist + alpha / n
  return (out / out.sum()).astype(np.float32)


def uniform(n: int) -> np.ndarray:
  return np.full((n,), 1.0 / n, np.float32)


def gaussian_mixture(
    boxes_tok: np.ndarray, grid_h: int, grid_w: int, sigma_scale: float = 0.25
) -> np.ndarray:
  """EASE's equal-weight mixture of per-box Gaussians: float64[N], sums to 1.

  Each box contributes a 2-D Gaussian over token centres (c + 0.5, r + 0.5)
  centred on the box centre with sigma = sigma_scale * box side (token
  units), normalized over the grid before mixing, so every box weighs the
  same whatever its size or position.
  """
  boxes = np.asarray(boxes_tok, np.float64).reshape(-1, 4)
  if len(boxes) == 0:
    raise ValueError("gaussian_mixture needs at least one box")
  cy, cx = np.meshgrid(
      np.arange(grid_h) + 0.5, np.arange(grid_w) + 0.5, indexing="ij"
  )
  mix = np.zeros((grid_h, grid_w), np.float64)
  for x0, y0, x1, y1 in boxes:
    sx = max(sigma_scale * (x1 - x0), 1e-6)
    sy = max(sigma_scale * (y1 - y0), 1e-6)
    logp = -0.5 * (
        ((cx - (x0 + x1) / 2) / sx) ** 2 + ((cy - (y0 + y1) / 2) / sy) ** 2
    )
    # Subtracting the max keeps a tiny box from underflowing to all zeros
    # (it then concentrates on the nearest token centre).
    p = np.exp(logp - logp.max())
    mix += p / p.sum()
  mix /= len(boxes)
  return mix.reshape(-1)


def ease_target(
    boxes_tok: np.ndarray,
    grid_h: int,
    grid_w: int,
    sigma_scale: float = 0.25,
    alpha: float = 0.1,
) -> tuple[np.ndarray, bool]:
  """EASE target over one image's tokens (docs/methods.md section 3).

  t = (1 - alpha) * mixture + alpha * uniform, with `gaussian_mixture`.

  Args:
    boxes_tok: float[n, 4] boxes in token units (`boxes_to_tokens`).
    grid_h: merged-token rows.
    grid_w: merged-token columns.
    sigma_scale: Gaussian sigma as a fraction of the box side.
    alpha: weight of the uniform component.

  Returns:
    float32[N] summing to 1, and whether there was a box (without one the
    target is uniform and the caller may skip the example).
  """
  n = grid_h * grid_w
  if len(np.asarray(boxes_tok).reshape(-1, 4)) == 0:
    return uniform(n), False
  mix = gaussian_mixture(boxes_tok, grid_h, grid_w, sigma_scale)
  return _smooth(mix, alpha), True


def focus_target(
    boxes_tok: np.ndarray, grid_h: int, grid_w: int, alpha: float = 0.0
) -> tuple[np.ndarray, bool]:
  """Faithful-MR1 anchoring target: uniform over covered tokens.

  Tokens are covered by the coverage rule of `evidence_token_mask`; the
  result is (1 - alpha) * that + alpha * uniform.

  Returns:
    float32[N] summing to 1, and whether there was a box (without one the
    target is uniform).
  """
  n = grid_h * grid_w
  mask = evidence_token_mask(boxes_tok, grid_h, grid_w)
  if not mask.any():
    return uniform(n), False
  return _smooth(mask / mask.sum(), alpha), True


def example_targets(
    boxes_tok: np.ndarray,
    grids_hw: Sequence[tuple[int, int]],
    box_image: int = 0,
    *,
    sigma_scale: float = 0.25,
    ease_alpha: float = 0.1,
    focus_alpha: float = 0.0,
) -> dict[str, np.ndarray]:
  """Targets over all of an example's visual tokens (images in order).

  The boxes refer to image `box_image`; the mixture puts no mass on the
  other images' tokens, and the alpha-uniform part spreads over all of the
  example's visual tokens (the columns the attention is normalized over).

  Args:
    boxes_tok: float[n, 4] boxes in token units of image `box_image`.
    grids_hw: merged-token (grid_h, grid_w) of each image.
    box_image: index of the image the boxes refer to.
    sigma_scale: see `ease_target`.
    ease_alpha: see `ease_target`.
    focus_alpha: see `focus_target`.

  Returns:
    ease_target float32[V], focus_target float32[V], evidence_mask bool[V]
    (V = sum of grid_h * grid_w), has_boxes bool[].
  """
  if not 0 <= box_image < len(grids_hw):
    raise ValueError(f"box_image={box_image} but there are {len(grids_hw)}")
  sizes = [gh * gw for gh, gw in grids_hw]
  total = sum(sizes)
  start = sum(sizes[:box_image])
  gh, gw = grids_hw[box_image]
  mask = np.zeros((total,), bool)
  mask[start : start + gh * gw] = evidence_token_mask(boxes_tok, gh, gw)
  has = len(np.asarray(boxes_tok).reshape(-1, 4)) > 0
  if not has:
    return dict(
        ease_target=uniform(total),
        focus_target=uniform(total),
        evidence_mask=mask,
        has_boxes=np.asarray(False),
    )
  mix = np.zeros((total,), np.float64)
  mix[start : start + gh * gw] = gaussian_mixture(
      boxes_tok, gh, gw, sigma_scale
  )
  return dict(
      ease_target=_smooth(mix, ease_alpha),
      focus_target=_smooth(mask / mask.sum(), focus_alpha),
      evidence_mask=mask,
      has_boxes=np.asarray(True),
  )


def token_pixel_mask(
    token_mask: np.ndarray, grid_h: int, grid_w: int, token_pixels: int = 28
) -> np.ndarray:
  """Pixels of the resized image inside the masked tokens' cells: bool[H, W]."""
  grid = np.asarray(token_mask, bool).reshape(grid_h, grid_w)
  return np.repeat(np.repeat(grid, token_pixels, axis=0), token_pixels, axis=1)


FILLS = ("mean", "black", "gray", "blur")


def counterfactual_image(
    resized_image: np.ndarray,
    covered_token_mask: np.ndarray,
    fill: str = "mean",
    *,
    token_pixels: int = 28,
    blur_radius: float = 8.0,
) -> np.ndarray:
  """The resized image with the evidence tokens' cells masked out.

  Exactly the pixels of the covered tokens' token_pixels x token_pixels
  cells change; every other pixel is the original's.

  Args:
    resized_image: uint8[H, W, 3], the processor-resized image (H, W
      multiples of `token_pixels`).
    covered_token_mask: bool[N] or bool[grid_h, grid_w] (row-major tokens).
    fill: 'mean' (the image's mean pixel, per channel, rounded), 'black'
      (0), 'gray' (128) or 'blur' (a Gaussian blur of the image, radius
      `blur_radius` px).
    token_pixels: side of one merged token in pixels.
    blur_radius: Gaussian blur radius for fill='blur'.

  Returns:
    uint8[H, W, 3].
  """
  img = np.asarray(resized_image)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected uint8[H, W, 3], got {img.dtype}{img.shape}")
  height, width = img.shape[:2]
  if height % token_pixels or width % token_pixels:
    raise ValueError(
        f"image of {height}x{width} px is not a multiple of {token_pixels}"
    )
  gh, gw = height // token_pixels, width // token_pixels
  if np.asarray(covered_token_mask).size != gh * gw:
    raise ValueError(
        f"token mask has {np.asarray(covered_token_mask).size} entries, the"
        f" image has {gh}x{gw} tokens"
    )
  pix = token_pixel_mask(covered_token_mask, gh, gw, token_pixels)
  if fill == "mean":
    total = img.reshape(-1, 3).sum(axis=0, dtype=np.int64)
    value = np.round(total / (height * width)).astype(np.uint8)
    source = np.broadcast_to(value, img.shape)
  elif fill == "black":
    source = np.zeros_like(img)
  elif fill == "gray":
    source = np.full_like(img, 128)
  elif fill == "blur":
    blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur_radius))
    source = np.asarray(blurred)
  else:
    raise ValueError(f"fill={fill!r} not in {FILLS}")
  return np.where(pix[..., None], source, img)
