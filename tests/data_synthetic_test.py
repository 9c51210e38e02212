"""Synthetic evidence-VQA: determinism, exact boxes, balance, TFDS, tokenizer."""

import collections
import dataclasses
import io

import numpy as np
from PIL import Image
import pytest

from faithful_rl import data
from faithful_rl.data import builders
from faithful_rl.data import synthetic

CFG = synthetic.SyntheticConfig()


def decode(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_records_are_deterministic_and_splits_disjoint():
  a = list(synthetic.generate(CFG, "train", 14, seed=3))
  b = list(synthetic.generate(CFG, "train", 14, seed=3))
  for x, y in zip(a, b):
    assert x["image"] == y["image"] and x["question"] == y["question"]
    np.testing.assert_array_equal(x["boxes"], y["boxes"])
  other = list(synthetic.generate(CFG, "test", 14, seed=3))
  assert all(x["image"] != y["image"] for x, y in zip(a, other))
  assert [r["family"] for r in a[:7]] == list(synthetic.FAMILIES)
  rec = a[5]  # arithmetic: two evidence boxes
  assert rec["boxes"].dtype == np.float32 and rec["boxes"].shape == (2, 4)
  assert rec["reference_response"].endswith(f"\\boxed{{{rec['answer']}}}")
  assert set(rec) == {
      "id",
      "image",
      "question",
      "answer",
      "answer_type",
      "boxes",
      "box_labels",
      "family",
      "reference_response",
  }


def test_evidence_boxes_are_the_exact_pixel_extent():
  for i in range(28):
    scene = synthetic.make_scene(CFG, 0, "validation", i)
    img = synthetic.render(scene).astype(int)
    for obj in scene.objects:
      x0, y0, x1, y1 = obj.box
      # Pixels of the object's fill colour, looked for with a margin.
      patch = img[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2]
      ys, xs = np.nonzero((patch == obj.fill).all(-1))
      oy, ox = max(0, y0 - 2), max(0, x0 - 2)
      assert (xs.min() + ox, ys.min() + oy) == (x0, y0), (i, obj)
      assert (xs.max() + ox + 1, ys.max() + oy + 1) == (x1, y1), (i, obj)
    np.testing.assert_array_equal(
        scene.boxes,
        np.reshape([scene.objects[k].box for k in scene.evidence], (-1, 4)),
    )


def test_image_size_and_difficulty_knobs():
  cfg = synthetic.SyntheticConfig(
      image_sizes=((224, 168),), max_distractors=4, difficulty=1.0
  )
  for rec in synthetic.generate(cfg, "train", 7):
    img = decode(rec["image"])
    assert img.shape == (168, 224, 3)
    b = rec["boxes"]
    assert np.all(b[:, 2] <= 224) and np.all(b[:, 3] <= 168)
  with pytest.raises(ValueError):
    synthetic.SyntheticConfig(families=("count", "poetry"))


def test_answers_balanced_and_question_only_baseline_at_chance():
  train = synthetic.qa_triples(CFG, "train", 3500)
  test = synthetic.qa_triples(CFG, "test", 3500)
  result = synthetic.question_only_baseline(train, test, CFG)
  print(
      f"\nquestion-only majority baseline: {result['accuracy']:.4f}"
      f" (chance {result['chance']:.4f}); per family {result['per_family']}"
  )
  # Chance ~0.217; the standard error at 3500 examples is ~0.007.
  assert abs(result["accuracy"] - result["chance"]) < 0.025
  counts = collections.defaultdict(collections.Counter)
  for family, _, answer in train:
    counts[family][answer] += 1
  for family, c in counts.items():
    assert len(c) == CFG.num_answers(family), family
    expected = sum(c.values()) / len(c)
    assert max(c.values()) < 1.5 * expected, (family, c)


def test_tfds_builder_round_trip(tmp_path):
  cfg = dataclasses.replace(CFG, families=("count", "exist"))
  builder = builders.build_synthetic(
      str(tmp_path),
      "default",
      name="tiny",
      num_train=9,
      num_validation=3,
      num_test=0,
      synthetic=cfg,
  )
  # The description states this config's knobs, not the default's.
  assert "families count, exist," in builder.builder_config.description
  src = data.data_source("evidence_vqa/tiny", "train", str(tmp_path))
  assert len(src) == 9
  expected = list(synthetic.generate(cfg, "train", 9))
  for i in range(9):
    got = src[i]
    assert got["id"].decode() == expected[i]["id"]
    assert got["image"] == expected[i]["image"]
    assert got["question"].decode() == expected[i]["question"]
    np.testing.assert_array_equal(got["boxes"], expected[i]["boxes"])
    assert [s.decode() for s in got["box_labels"]] == expected[i]["box_labels"]
  val = data.data_source("evidence_vqa/tiny", "validation", str(tmp_path))
  assert len(val) == 3


def test_demo_tokenizer_covers_the_task_and_round_trips():
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  tok = AutoTokenizer.from_pretrained(
      data.demo_tokenizer_dir(), local_files_only=True
  )
  assert 300 <= len(tok) <= 600
  ids = data.special_token_ids(tok)
  assert (ids.endoftext, ids.im_start, ids.im_end, ids.image_pad) == (
      0,
      1,
      2,
      5,
  )
  assert ids.focus == 7 and ids.pad == 0
  pre = tok.backend_tokenizer.pre_tokenizer
  for text in synthetic.corpus(CFG, num_examples=300, seed=11):
    enc = tok(text, add_special_tokens=False)["input_ids"]
    # Every word, number and punctuation run is one token.
    assert len(enc) == len(pre.pre_tokenize_str(text)), text
    assert tok.decode(enc) == text
  for text in ("Ünïcödé ∑ 🤖 text\twith\n\nodd  spacing", "<Focus>x"):
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text
