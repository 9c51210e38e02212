"""Box -> token mapping, EASE / focus targets and counterfactual images."""

import math

import numpy as np
import pytest

from faithful_rl.data import targets


def covered(boxes_tok, gh, gw):
  return set(np.flatnonzero(targets.evidence_token_mask(boxes_tok, gh, gw)))


def test_resized_box_to_tokens_hand_worked():
  # A 100x80 (w x h) image: 84x112 is under min_pixels=112*112, so the
  # processor scales by sqrt(12544 / 8000) and rounds up to 28: 112x140
  # (h x w), a 4x5 grid. x and y both scale by 1.4.
  tok, clipped = targets.boxes_to_tokens(
      np.array([[20, 16, 60, 48]]), (80, 100), (112, 140)
  )
  # [28, 22.4, 84, 67.2] px -> [1, 0.8, 3, 2.4] tokens.
  np.testing.assert_allclose(tok, [[1.0, 0.8, 3.0, 2.4]], rtol=1e-6)
  assert clipped == 0
  # Columns 1..2 (x1 = 3 is an edge), rows 0..2; index = row * 5 + col.
  assert covered(tok, 4, 5) == {1, 2, 6, 7, 11, 12}
  assert targets.token_index(2, 1, 5) == 11


def test_box_on_token_edges_covers_no_neighbour():
  tok, _ = targets.boxes_to_tokens(
      np.array([[28, 56, 84, 112]]), (112, 112), (112, 112)
  )
  np.testing.assert_array_equal(tok, [[1, 2, 3, 4]])
  assert covered(tok, 4, 4) == {9, 10, 13, 14}
  # Normalized boxes are fractions of the original image.
  norm, _ = targets.boxes_to_tokens(
      np.array([[0.25, 0.5, 0.75, 1.0]]), (112, 112), (112, 112)
  )
  np.testing.assert_array_equal(norm, tok)
  # A box inside one cell covers exactly that cell.
  assert covered(np.array([[2.1, 0.2, 2.9, 0.8]]), 4, 4) == {2}


def test_box_partly_outside_is_clipped_and_counted():
  tok, clipped = targets.boxes_to_tokens(
      np.array([[-10, 100, 50, 130], [10, 10, 20, 20]]), (112, 112), (112, 112)
  )
  assert clipped == 1
  np.testing.assert_allclose(tok[0], [0, 100 / 28, 50 / 28, 4], rtol=1e-6)
  assert covered(tok[:1], 4, 4) == {12, 13}


@pytest.mark.parametrize(
    "box,kind",
    [
        ([10, 10, 10, 50], "zero-area"),
        ([30, 10, 20, 50], "inverted"),
        ([10, 50, 30, 40], "inverted"),
        ([200, 10, 250, 50], "outside"),
    ],
)
def test_bad_boxes_raise_naming_the_record(box, kind):
  with pytest.raises(targets.BoxError, match=f"record 'r7'.*{kind}"):
    targets.boxes_to_tokens(
        np.array([box]), (112, 112), (112, 112), record_id="r7"
    )


def test_ease_target_hand_worked():
  # One box on token (1, 1) of a 3x3 grid: sigma = 0.25 token, so a
  # neighbour at distance 1 has weight exp(-8), a diagonal one exp(-16).
  t, has = targets.ease_target(np.array([[1, 1, 2, 2]]), 3, 3)
  assert has
  z = 1 + 4 * math.exp(-8) + 4 * math.exp(-16)
  np.testing.assert_allclose(t[4], 0.9 / z + 0.1 / 9, rtol=1e-6)
  np.testing.assert_allclose(t[1], 0.9 * math.exp(-8) / z + 0.1 / 9, rtol=1e-5)
  np.testing.assert_allclose(t[0], 0.9 * math.exp(-16) / z + 0.1 / 9, rtol=1e-5)
  np.testing.assert_allclose(t.sum(), 1.0, rtol=1e-6)


def test_ease_mixes_boxes_with_equal_weight():
  # A big and a small box in opposite corners get the same total mass.
  boxes = np.array([[0, 0, 2, 2], [3.5, 3.5, 4, 4]])
  t, _ = targets.ease_target(boxes, 4, 4, alpha=0.0)
  grid = t.reshape(4, 4)
  # Box 0: centre (1, 1), sigma 0.5; token centres lie 0.5, 0.5, 1.5, 2.5
  # away per axis. Box 1: sigma 0.125, all but nothing on token (3, 3).
  w = np.exp(-0.5 * (np.array([0.5, 0.5, 1.5, 2.5]) / 0.5) ** 2)
  np.testing.assert_allclose(
      grid[:2, :2].sum(), 0.5 * (w[:2].sum() / w.sum()) ** 2, rtol=1e-5
  )
  np.testing.assert_allclose(grid[3, 3], 0.5, atol=1e-6)
  # Non-square boxes: sigma follows each side.
  t, _ = targets.ease_target(np.array([[0, 1, 4, 2]]), 3, 4, alpha=0.0)
  row = t.reshape(3, 4)
  assert row[1].sum() > 0.99 and np.ptp(row[1]) < 0.5


def test_no_box_gives_uniform_and_flag():
  for fn in (targets.ease_target, targets.focus_target):
    t, has = fn(np.zeros((0, 4)), 2, 3)
    assert not has
    np.testing.assert_allclose(t, np.full(6, 1 / 6), rtol=1e-6)


def test_focus_target_uniform_over_covered_tokens():
  t, has = targets.focus_target(np.array([[1, 0.8, 3, 2.4]]), 4, 5)
  assert has
  expect = np.zeros(20)
  expect[[1, 2, 6, 7, 11, 12]] = 1 / 6
  np.testing.assert_allclose(t, expect, rtol=1e-6)
  t, _ = targets.focus_target(np.array([[1, 0.8, 3, 2.4]]), 4, 5, alpha=0.2)
  np.testing.assert_allclose(t, 0.8 * expect + 0.2 / 20, rtol=1e-6)


def test_every_target_sums_to_one():
  rng = np.random.default_rng(0)
  for _ in range(50):
    gh, gw = rng.integers(1, 9, size=2)
    n = rng.integers(0, 4)
    x0 = rng.uniform(0, gw - 0.05, n)
    y0 = rng.uniform(0, gh - 0.05, n)
    boxes = np.stack(
        [x0, y0, rng.uniform(x0 + 0.01, gw), rng.uniform(y0 + 0.01, gh)], -1
    )
    for t, _ in (
        targets.ease_target(boxes, gh, gw, alpha=rng.uniform(0, 1)),
        targets.focus_target(boxes, gh, gw, alpha=rng.uniform(0, 1)),
    ):
      assert t.dtype == np.float32 and t.shape == (gh * gw,)
      assert np.all(t >= 0)
      np.testing.assert_allclose(t.sum(), 1.0, rtol=1e-5)


def test_example_targets_over_two_images():
  # Boxes on image 1 (a 2x2 grid) after image 0 (a 1x3 grid): V = 7.
  tg = targets.example_targets(
      np.array([[0, 0, 1, 1]]), [(1, 3), (2, 2)], box_image=1, ease_alpha=0.1
  )
  np.testing.assert_array_equal(tg["evidence_mask"], [0, 0, 0, 1, 0, 0, 0])
  np.testing.assert_allclose(tg["focus_target"], [0, 0, 0, 1, 0, 0, 0])
  ease = tg["ease_target"]
  np.testing.assert_allclose(ease.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ease[:3], 0.1 / 7, rtol=1e-5)
  assert ease[3] > 0.8 and bool(tg["has_boxes"])


def test_counterfactual_masks_exactly_the_evidence_cells():
  rng = np.random.default_rng(0)
  img = rng.integers(1, 256, size=(112, 140, 3), dtype=np.uint8)
  mask = targets.evidence_token_mask(np.array([[1, 0.8, 3, 2.4]]), 4, 5)
  expect = np.zeros((112, 140), bool)
  expect[0:84, 28:84] = True  # rows 0..2, columns 1..2 of 28-px cells
  mean = np.round(img.reshape(-1, 3).mean(0)).astype(np.uint8)
  for fill in targets.FILLS:
    cf = targets.counterfactual_image(img, mask, fill)
    assert cf.dtype == np.uint8 and cf.shape == img.shape
    np.testing.assert_array_equal(cf[~expect], img[~expect])
    if fill == "black":
      np.testing.assert_array_equal((cf != img).any(-1), expect)
    if fill == "mean":
      np.testing.assert_array_equal(
          cf[expect], np.broadcast_to(mean, (84 * 56, 3))
      )
    if fill == "gray":
      assert np.all(cf[expect] == 128)
  with pytest.raises(ValueError, match="fill"):
    targets.counterfactual_image(img, mask, "pink")
