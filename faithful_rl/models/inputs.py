"""Host-side (numpy) preparation of model inputs with static shapes.

Everything that depends on image sizes is computed here, once per example,
before the jit boundary: the 3-D M-RoPE position ids, and the vision
tower's layout (patch order for window attention, segment ids for window
and full attention, 2-D rotary positions, the inverse permutation of the
merged tokens). The jitted model then only sees fixed-shape arrays, so an
example's images may have any sizes as long as they fit the patch bucket.

Layout of one example's vision buffer (`P` patches, `V = P / 4` merged
tokens): the example's images back to back, in the order their
`<|image_pad|>` runs appear in `input_ids`, then zero padding. Patches come
in the image processor's order, where each run of 4 consecutive patches is
one 2x2 merge group (one visual token).

Axis alphabet: B batch, T text positions, P patches, V merged visual
tokens, M images per example.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import VisionConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionInputs:
  """Fixed-shape vision inputs for a batch (a pytree of arrays).

  Attributes:
    pixel_values: float[B, P, patch_dim], image patches, zero-padded.
    window_perm: int32[B, P], patch order for window attention.
    window_seg: int32[B, P], window id per patch, in window order (-1: pad).
    full_seg: int32[B, P], image id per patch, in window order (-1: pad).
    rot_pos: int32[B, P, 2], (row, col) of each patch, in window order.
    merge_restore: int32[B, V], from window order back to image order.
    token_valid: bool[B, V], real (not padding) merged visual tokens.
  """

  pixel_values: np.ndarray
  window_perm: np.ndarray
  window_seg: np.ndarray
  full_seg: np.ndarray
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


def window_index(grids, vcfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """Window order of merged tokens and window lengths (in patches).

  Mirrors `transformers`' `get_vision_window_index`: each image's merged
  grid is cut into windows of `window_size // merge // patch` tokens a side
  (the last row and column of windows may be smaller), windows are visited
  row-major, and tokens row-major inside each window.

  Returns:
    index: int[n_tokens], merged-token ids in window order.
    seqlens: int[n_windows], patches per (non-empty) window.
  """
  m = vcfg.spatial_merge_size
  ws = vcfg.window_size // m // vcfg.patch_size
  if ws <= 0:
    raise ValueError(
        f"vision window_size={vcfg.window_size} is smaller than one merged"
        f" token ({m * vcfg.patch_size} px)"
    )
  index, seqlens, offset = [], [], 0
  for t, h, w in grids:
    gh, gw = h // m, w // m
    ids = np.arange(t * gh * gw).reshape(t, gh, gw)
    ph, pw = -gh % ws, -gw % ws
    padded = np.pad(ids, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
    nh, nw = (gh + ph) // ws, (gw + pw) // ws
    win = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4)
    win = win.reshape(t * nh * nw, ws * ws)
    for row in win:
      kept = row[row >= 0]
      if kept.size:
        index.append(kept + offset)
        seqlens.append(kept.size * m * m)
    offset += t * gh * gw
  if not index:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return np.concatenate(index), np.asarray(seqlens)


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
    grids: Sequence[tuple[int, int, int]], num_patches: int, vcfg: VisionConfig
) -> dict[str, np.ndarray]:
  """Layout arrays (see `VisionInputs`) for one example's images."""
  unit = vcfg.merge_unit
  if num_patches % unit:
    raise ValueError(f"patch bucket {num_patches} is not a multiple of {unit}")
  n = sum(t * h * w for t, h, w in grids)
  if n > num_patches:
    raise ValueError(
        f"images need {n} patches ({n // unit} visual tokens), more than the"
        f" bucket of {num_patches} patches ({num_patches // unit} tokens)"
    )
  n_tok, v = n // unit, num_patches // unit
  win_idx, win_lens = window_index(grids, vcfg)
  group_perm = np.concatenate([win_idx, np.arange(n_tok, v)]).astype(np.int64)
  perm = (group_perm[:, None] * unit + np.arange(unit)).reshape(-1)
  window_seg = np.full((num_patches,), -1, np.int32)
  window_seg[:n] = np.repeat(np.arange(len(win_lens)), win_lens)
  full_seg = np.full((num_patches,), -1, np.int32)
  frame_lens = [h * w for t, h, w in grids for _ in range(t)]
  full_seg[:n] = np.repeat(np.arange(len(frame_lens)), frame_lens)
  rot = np.zeros((num_patches, 2), np.int32)
  rot[:n] = rotary_positions(grids, vcfg.spatial_merge_size)
  return dict(
      window_perm=perm.astype(np.int32),
      window_seg=window_seg,
      full_seg=full_seg,
      rot_pos=rot[perm],
      merge_restore=np.argsort(group_perm).astype(np.int32),
      token_valid=np.arange(v) < n_tok,
  )


def vision_inputs(
    pixel_values: Sequence[np.ndarray],
    grids: Sequence[Sequence[tuple[int, int, int]]],
    num_patches: int,
    vcfg: VisionConfig,
) -> VisionInputs:
  """Pads per-example patch arrays into a fixed-shape `VisionInputs`.

  Args:
    pixel_values: per example, float[n_b, patch_dim] (its images' patches).
    grids: per example, the (t, h, w) patch grid of each of its images.
    num_patches: the patch bucket P (a multiple of 4).
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


def bucket_patches(grids_per_example, vcfg: VisionConfig, multiple: int = 64):
  """Smallest patch bucket (a multiple of `multiple`) fitting every example."""
  need = max([sum(t * h * w for t, h, w in g) for g in grids_per_example] + [0])
  multiple = max(multiple, vcfg.merge_unit)
  return max(multiple, -(-need // multiple) * multiple)
