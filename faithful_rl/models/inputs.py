"""Host-side (numpy) preparation of model inputs with static shapes.

Everything that depends on image sizes is computed here, once per example,
before the jit boundary: the 3-D M-RoPE position ids, and the vision
tower's layout (which patch fills each slot of the window-padded buffer,
segment ids, 2-D rotary positions, where each merged token lands). The
jitted model then only sees fixed-shape arrays, so an example's images may
have any sizes as long as they fit the patch bucket.

Pixel buffer of one example (`P` patches): the example's images back to
back, in the order their `<|image_pad|>` runs appear in `input_ids`, then
zero padding, in the image processor's patch order (each run of 4
consecutive patches is one 2x2 merge group, one visual token).

Layout buffer (also `P` slots), what the vision tower computes on: when
the model has window-attention blocks, every attention window of every
image frame occupies exactly `window_patches` consecutive slots (its merge
groups row-major, then padding slots), so a window block is an exact
[windows, c, c] product; without window blocks, the frames' patches lie
back to back. A bucket must hold the layout, which is larger than the
patch count by the edge windows' padding (`layout_patches`).

Axis alphabet: B batch, T text positions, P patches (slots), V merged
visual tokens, M images per example.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import VisionGeometry


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionInputs:
  """Fixed-shape vision inputs for a batch (a pytree of arrays).

  Attributes:
    pixel_values: float[B, P, patch_dim], image patches, zero-padded.
    patch_index: int32[B, P], the patch (row of pixel_values) in each
      layout slot (0 in padding slots).
    patch_seg: int32[B, P], the image frame of each slot (-1: padding).
    rot_pos: int32[B, P, 2], (row, col) of each slot's patch.
    merge_restore: int32[B, V], the merged slot (slot // 4) holding each
      visual token, in image order (V = P // 4).
    token_valid: bool[B, V], real (not padding) merged visual tokens.
  """

  pixel_values: np.ndarray
  patch_index: np.ndarray
  patch_seg: np.ndarray
  rot_pos: np.ndarray
  merge_restore: np.ndarray
  token_valid: np.ndarray

  @property
  def num_patches(self) -> int:
    return self.pixel_values.shape[1]


def _grid_list(grid_thw) -> list[tuple[int, int, int]]:
  grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return [tuple(int(x) for x in g) for g in grids if g.prod() > 0]


def image_token_count(grid_thw, spatial_merge_size: int) -> int:
  t, h, w = (int(x) for x in grid_thw)
  return t * h * w // (spatial_merge_size**2)


def window_tokens(vcfg: VisionGeometry) -> int:
  """Merged tokens on a side of one attention window."""
  ws = vcfg.window_size // vcfg.spatial_merge_size // vcfg.patch_size
  if ws <= 0:
    raise ValueError(
        f"vision window_size={vcfg.window_size} is smaller than one merged"
        f" token ({vcfg.spatial_merge_size * vcfg.patch_size} px)"
    )
  return ws


def frame_windows(gh: int, gw: int, vcfg: VisionGeometry) -> list[np.ndarray]:
  """Merged-token ids (row-major in the frame) of each attention window.

  As `transformers`' `get_vision_window_index`: windows of `ws` x `ws`
  tokens visited row-major, tokens row-major inside each, the last row and
  column of windows possibly smaller. Without window blocks: one window.
  """
  ids = np.arange(gh * gw).reshape(gh, gw)
  if not vcfg.has_windows:
    return [ids.reshape(-1)]
  ws = window_tokens(vcfg)
  return [
      ids[r : r + ws, c : c + ws].reshape(-1)
      for r in range(0, gh, ws)
      for c in range(0, gw, ws)
  ]


def layout_patches(grids, vcfg: VisionGeometry) -> int:
  """Slots the layout of these images needs (a patch bucket must hold it)."""
  m = vcfg.spatial_merge_size
  total = 0
  for t, h, w in grids:
    if vcfg.has_windows:
      n_win = len(frame_windows(h // m, w // m, vcfg))
      total += t * n_win * vcfg.window_patches
    else:
      total += t * h * w
  return total


def rotary_positions(grids, spatial_merge_size: int) -> np.ndarray:
  """(row, col) of every patch, in merge-group-major order: int[n, 2]."""
  m = spatial_merge_size
  out = []
  for t, h, w in grids:
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // m, m, w // m, m)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hpos, wpos], -1), (t, 1)))
  if not out:
    return np.zeros((0, 2), np.int64)
  return np.concatenate(out)


def example_vision_layout(
    grids: Sequence[tuple[int, int, int]],
    num_patches: int,
    vcfg: VisionGeometry,
) -> dict[str, np.ndarray]:
  """Layout arrays (see `VisionInputs`) for one example's images."""
  unit, m = vcfg.merge_unit, vcfg.spatial_merge_size
  if num_patches % unit:
    raise ValueError(f"patch bucket {num_patches} is not a multiple of {unit}")
  c = vcfg.window_patches if vcfg.has_windows else None
  if c and num_patches % c:
    raise ValueError(
        f"patch bucket {num_patches} is not a multiple of the attention"
        f" window's {c} patches"
    )
  n = sum(t * h * w for t, h, w in grids)
  need = layout_patches(grids, vcfg)
  if need > num_patches:
    raise ValueError(
        f"images need {need} patch slots ({n} patches, {n // unit} visual"
        " tokens, plus the padding of partial attention windows), more"
        f" than the bucket of {num_patches} patches"
    )
  tokens, segs = [], []  # per slot group: merged token id (-1 pad), frame
  offset = frame = 0
  for t, h, w in grids:
    gh, gw = h // m, w // m
    for ti in range(t):
      base = offset + ti * gh * gw
      for win in frame_windows(gh, gw, vcfg):
        groups = np.full(len(win) if c is None else c // unit, -1, np.int64)
        groups[: len(win)] = win + base
        tokens.append(groups)
        segs.append(np.full(groups.shape, frame, np.int32))
      frame += 1
    offset += t * gh * gw
  v = num_patches // unit
  tok = np.full(v, -1, np.int64)
  seg_g = np.full(v, -1, np.int32)
  if tokens:
    cat = np.concatenate(tokens)
    tok[: cat.size] = cat
    seg_g[: cat.size] = np.where(cat >= 0, np.concatenate(segs), -1)
  real = tok >= 0
  patch = np.where(real[:, None], tok[:, None] * unit + np.arange(unit), 0)
  seg = np.repeat(seg_g, unit)
  rot = np.zeros((num_patches, 2), np.int32)
  rot_all = rotary_positions(grids, m)
  slot_real = np.repeat(real, unit)
  rot[slot_real] = rot_all[patch.reshape(-1)[slot_real]]
  n_tok = n // unit
  restore = np.zeros(v, np.int32)
  restore[tok[real]] = np.nonzero(real)[0]
  return dict(
      patch_index=patch.reshape(-1).astype(np.int32),
      patch_seg=seg,
      rot_pos=rot,
      merge_restore=restore,
      token_valid=np.arange(v) < n_tok,
  )


def vision_inputs(
    pixel_values: Sequence[np.ndarray],
    grids: Sequence[Sequence[tuple[int, int, int]]],
    num_patches: int,
    vcfg: VisionGeometry,
) -> VisionInputs:
  """Pads per-example patch arrays into a fixed-shape `VisionInputs`.

  Args:
    pixel_values: per example, float[n_b, patch_dim] (its images' patches).
    grids: per example, the (t, h, w) patch grid of each of its images.
    num_patches: the patch bucket P (holds `layout_patches` of each
      example; a multiple of 4 and of the window's patches).
    vcfg: the vision config.
  """
  batch = len(grids)
  pix = np.zeros((batch, num_patches, vcfg.patch_dim), np.float32)
  parts = []
  for b in range(batch):
    layout = example_vision_layout(grids[b], num_patches, vcfg)
    n = sum(t * h * w for t, h, w in grids[b])
    pv = np.asarray(pixel_values[b], np.float32).reshape(-1, vcfg.patch_dim)
    if pv.shape[0] != n:
      raise ValueError(
          f"example {b}: pixel_values has {pv.shape[0]} patches but its"
          f" image_grid_thw {list(grids[b])} needs {n}"
      )
    pix[b, :n] = pv
    parts.append(layout)
  stacked = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
  return VisionInputs(pixel_values=pix, **stacked)


def split_hf_images(
    input_ids: np.ndarray,
    pixel_values: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    config: ModelConfig,
) -> tuple[list[np.ndarray], list[list[tuple[int, int, int]]]]:
  """Splits HF's batch-packed images into per-example lists.

  HF concatenates every image of the batch (`pixel_values[sum_n, D]`,
  `image_grid_thw[n_images, 3]`) and assigns them to `<|image_pad|>` tokens
  in reading order; we assign each example the images its tokens consume.
  """
  input_ids = np.asarray(input_ids)
  batch = input_ids.shape[0]
  grids_all = [] if image_grid_thw is None else _grid_list(image_grid_thw)
  m = config.vision.spatial_merge_size
  pix_parts, grid_parts, gi, pi = [], [], 0, 0
  for b in range(batch):
    need = int((input_ids[b] == config.image_token_id).sum())
    mine = []
    while need > 0:
      if gi >= len(grids_all):
        raise ValueError(
            f"example {b}: input_ids has more <|image_pad|> tokens than"
            " image_grid_thw provides images for"
        )
      g = grids_all[gi]
      gi += 1
      need -= image_token_count(g, m)
      mine.append(g)
    if need < 0:
      raise ValueError(
          f"example {b}: the number of <|image_pad|> tokens does not match"
          " the visual tokens of its images in image_grid_thw"
      )
    n = sum(t * h * w for t, h, w in mine)
    pv = (
        np.zeros((0, config.vision.patch_dim), np.float32)
        if n == 0
        else np.asarray(pixel_values)[pi : pi + n]
    )
    pi += n
    pix_parts.append(pv)
    grid_parts.append(mine)
  if gi != len(grids_all):
    raise ValueError(
        f"image_grid_thw has {len(grids_all)} images but input_ids only has"
        f" <|image_pad|> tokens for {gi}"
    )
  return pix_parts, grid_parts


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    grids: Sequence[Sequence[tuple[int, int, int]]],
    config: ModelConfig,
) -> tuple[np.ndarray, np.ndarray]:
  """3-D M-RoPE position ids, as `transformers`' `get_rope_index` (images).

  Text tokens advance all three axes together; an image of merged grid
  (t, h, w) gets temporal/row/column positions offset by the running
  position, which then advances by max(h, w). Padding positions are 0.

  Args:
    input_ids: int[B, T].
    attention_mask: int[B, T] (1 for real tokens) or None.
    grids: per example, the (t, h, w) patch grid of each image in order.
    config: the model config.

  Returns:
    position_ids: int32[3, B, T].
    rope_deltas: int32[B], max position + 1 - number of real tokens; the
      position of the i-th decoded token is `n_real + i + delta`.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  attention_mask = np.asarray(attention_mask).astype(bool)
  m = config.vision.spatial_merge_size
  positions = np.zeros((3, batch, length), np.int64)
  deltas = np.zeros((batch,), np.int64)
  for b in range(batch):
    ids = input_ids[b][attention_mask[b]]
    is_img = ids == config.image_token_id
    pieces, pos, i, img = [], 0, 0, 0
    while i < len(ids):
      if not is_img[i]:
        j = i
        while j < len(ids) and not is_img[j]:
          j += 1
        pieces.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
        pos += j - i
        i = j
        continue
      if img >= len(grids[b]):
        raise ValueError(f"example {b}: more image token runs than images")
      t, h, w = grids[b][img]
      img += 1
      gt, gh, gw = t, h // m, w // m
      tt, hh, ww = np.meshgrid(
          np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij"
      )
      pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
      pos += max(h, w) // m
      i += gt * gh * gw
    flat = (
        np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    )
    positions[:, b, attention_mask[b]] = flat
    deltas[b] = (flat.max() + 1 if flat.size else 0) - len(ids)
  return positions.astype(np.int32), deltas.astype(np.int32)


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
  """M-RoPE position ids of a text-only batch: int32[3, B, T]."""
  mask = np.asarray(attention_mask).astype(np.int64)
  pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0) * mask
  return np.broadcast_to(pos[None], (3,) + pos.shape).astype(np.int32)


def bucket_patches(grids_per_example, vcfg: VisionGeometry, multiple: int = 64):
  """Smallest patch bucket (a multiple of `multiple` and of the attention
  window) whose layout fits every example."""
  need = max([layout_patches(g, vcfg) for g in grids_per_example] + [0])
  multiple = int(np.lcm(max(multiple, vcfg.merge_unit), vcfg.slot_multiple))
  return max(multiple, -(-need // multiple) * multiple)
