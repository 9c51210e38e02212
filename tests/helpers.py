"""Tiny configs and inputs shared by the tests."""

from __future__ import annotations

import numpy as np

from faithful_rl.data.processing import Example

from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import VisionConfig

IMAGE, VSTART, VEND, PAD = 120, 118, 119, 0


def tiny_config(*, tied: bool = False, window: bool = True) -> ModelConfig:
  """Window attention with several full-attention blocks (or tied head)."""
  return ModelConfig(
      text=TextConfig(
          vocab_size=128,
          hidden_size=64,
          intermediate_size=96,
          num_hidden_layers=3,
          num_attention_heads=4,
          num_key_value_heads=2,
          rope_theta=10000.0,
          mrope_section=(2, 3, 3),
          max_position_embeddings=512,
          tie_word_embeddings=tied,
          rms_norm_eps=1e-6,
      ),
      vision=VisionConfig(
          depth=4,
          hidden_size=32,
          intermediate_size=48,
          num_heads=2,
          window_size=56 if window else 112,
          out_hidden_size=64,
          fullatt_block_indexes=(1, 3) if window else (0, 1, 2, 3),
          tokens_per_second=2,
      ),
      image_token_id=IMAGE,
      video_token_id=121,
      vision_start_token_id=VSTART,
      vision_end_token_id=VEND,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=PAD,
  )


def image_tokens(grid, merge: int = 2) -> list[int]:
  t, h, w = grid
  return [VSTART] + [IMAGE] * (t * h * w // merge**2) + [VEND]


def make_batch(rng, prompts, pad_side: str = "left"):
  """prompts: list of token lists -> (input_ids, attention_mask) padded."""
  length = max(len(p) for p in prompts)
  ids = np.full((len(prompts), length), PAD, np.int64)
  mask = np.zeros((len(prompts), length), np.int64)
  for i, p in enumerate(prompts):
    if pad_side == "left":
      ids[i, length - len(p) :] = p
      mask[i, length - len(p) :] = 1
    else:
      ids[i, : len(p)] = p
      mask[i, : len(p)] = 1
  return ids, mask


def random_text(rng, n: int) -> list[int]:
  return list(rng.integers(3, 110, size=n))


def random_pixels(rng, grids, patch_dim: int = 1176) -> np.ndarray:
  n = sum(t * h * w for t, h, w in grids)
  return rng.standard_normal((n, patch_dim)).astype(np.float32)


def example(rng, name, grids, n_before, n_after, **fields) -> Example:
  """A processed example: random text, its images, random text.

  Uniform EASE / focus targets, no boxes, no answer unless `fields` say.
  """
  prompt = random_text(rng, n_before)
  for g in grids:
    prompt += image_tokens(g) + random_text(rng, n_after)
  v = sum(t * h * w for t, h, w in grids) // 4
  values = dict(
      id=name,
      prompt_ids=np.asarray(prompt, np.int32),
      pixel_values=random_pixels(rng, grids),
      cf_pixel_values=random_pixels(rng, grids),
      image_grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
      ease_target=np.full((v,), 1.0 / max(v, 1), np.float32),
      focus_target=np.full((v,), 1.0 / max(v, 1), np.float32),
      evidence_mask=np.zeros((v,), bool),
      has_boxes=False,
      response_ids=np.asarray([2], np.int32),
      boxes_tok=np.zeros((0, 4), np.float32),
      box_image=0,
      answer="",
      answer_type="text",
  )
  values.update(fields)
  return Example(**values)
