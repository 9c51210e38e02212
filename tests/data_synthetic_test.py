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


# ---------------------------------------------------------------------------
# The prior-shortcut variant.
# ---------------------------------------------------------------------------

PRIOR = synthetic.SyntheticConfig(prior=0.7)


def test_usual_answers_follow_the_documented_table():
  usual = lambda family, q, cfg=PRIOR: synthetic.usual_answer(cfg, family, q)
  colours = [
      usual("attribute", f"What colour is the {s}?") for s in synthetic.SHAPES
  ]
  assert colours == ["red", "green", "blue", "yellow"]
  # c + s = 1 + 1 -> the third count, "3".
  assert usual("count", "How many green squares are there?") == "3"
  # c + s = 4 + 3 = 7, odd -> "yes".
  assert usual("exist", "Is there a purple diamond?") == "yes"
  # r + c + s = 3 ("below") + 2 ("blue") + 1 ("square") = 6 -> index 2.
  assert usual("spatial", "Which shape is below the blue square?") == "triangle"
  assert usual("digit", "What number is in the purple square?") == "9"
  q = "What is the sum of the numbers in the green circle and the red square?"
  assert usual("arithmetic", q) == "6"  # 1 + 5
  assert usual("chart", "What is the value of the yellow bar?") == "4"
  shifted = dataclasses.replace(PRIOR, prior_seed=1)
  assert usual("attribute", "What colour is the circle?", shifted) == "green"


def test_prior_holds_on_an_exact_even_share():
  one = dataclasses.replace(PRIOR, families=("attribute",))
  holds = [synthetic.prior_holds(one, "train", j) for j in range(10)]
  # ceil(0.7 (j + 1)) > ceil(0.7 j): 7 of every 10, evenly spread.
  assert holds == [1, 1, 1, 0, 1, 1, 0, 1, 1, 0]
  # With two families, each family's own examples follow the pattern.
  two = dataclasses.replace(PRIOR, families=("attribute", "count"))
  assert [synthetic.prior_holds(two, "train", i) for i in range(8)] == [
      1, 1, 1, 1, 1, 1, 0, 0,
  ]  # fmt: skip
  assert synthetic.prior_holds(PRIOR, "test_counter_prior", 3) is False
  assert synthetic.prior_holds(PRIOR, "test", 0) is None
  assert synthetic.prior_holds(CFG, "train", 0) is None
  with pytest.raises(ValueError, match="needs a prior"):
    synthetic.prior_holds(CFG, "test_in_prior", 0)
  with pytest.raises(ValueError):
    synthetic.SyntheticConfig(prior=1.5)


def test_prior_splits_and_the_question_only_baseline():
  """The issue's acceptance test: >= prior in-prior, <= chance counter-prior."""
  # 1000 per family, so that every question of arithmetic (90) and
  # spatial (80) is seen often enough for its majority answer to be usual.
  train = synthetic.qa_triples(PRIOR, "train", 7000)
  scores = {}
  for split in ("test_in_prior", "test_counter_prior", "test"):
    test = synthetic.qa_triples(PRIOR, split, 700)
    scores[split] = synthetic.question_only_baseline(train, test, PRIOR)
    share = np.mean(
        [a == synthetic.usual_answer(PRIOR, f, q) for f, q, a in test]
    )
    print(f"\n{split}: question-only {scores[split]}, usual share {share:.3f}")
    if split == "test_in_prior":
      assert share >= PRIOR.prior  # ceil(0.7 * 100) of each family's 100
    elif split == "test_counter_prior":
      assert share == 0.0
  in_prior = scores["test_in_prior"]
  counter = scores["test_counter_prior"]
  assert in_prior["accuracy"] >= PRIOR.prior
  assert counter["accuracy"] <= counter["chance"]
  assert counter["accuracy"] == 0.0  # it always answers the usual answer
  # The uniform test split is the base task's, record for record.
  base = list(synthetic.generate(CFG, "test", 7))
  for a, b in zip(synthetic.generate(PRIOR, "test", 7), base):
    assert a["image"] == b["image"] and a["answer"] == b["answer"]
  # Every answer stays possible off the prior, and images show the answer.
  answers = collections.Counter(a for f, _, a in train if f == "attribute")
  assert set(answers) == set(synthetic.COLOURS)


def test_tfds_builder_writes_the_prior_splits(tmp_path):
  cfg = dataclasses.replace(PRIOR, families=("attribute", "count"))
  builder = builders.build_synthetic(
      str(tmp_path),
      "default",
      name="tiny_prior",
      num_train=4,
      num_validation=0,
      num_test=3,
      num_prior_test=5,
      synthetic=cfg,
  )
  assert "hold on 70%" in builder.builder_config.description
  assert set(builder.info.splits) == {
      "train",
      "test",
      "test_in_prior",
      "test_counter_prior",
  }
  for split in synthetic.PRIOR_SPLITS:
    src = data.data_source("evidence_vqa/tiny_prior", split, str(tmp_path))
    expected = list(synthetic.generate(cfg, split, 5))
    assert [r["answer"].decode() for r in src] == [
        r["answer"] for r in expected
    ]
    assert src[0]["id"].decode() == f"{split}-0000000"


def test_reference_prior_biases_only_the_training_references():
  biased = dataclasses.replace(CFG, reference_prior=0.4)
  n, flipped, wrong_answers = 700, 0, 0
  for i, (a, b) in enumerate(
      zip(
          synthetic.generate(CFG, "train", n),
          synthetic.generate(biased, "train", n),
      )
  ):
    # The image, question and answer (what rewards check) are untouched.
    assert (a["image"], a["question"], a["answer"]) == (
        b["image"],
        b["question"],
        b["answer"],
    )
    said = b["reference_response"].rsplit("\\boxed{", 1)[1][:-1]
    if b["reference_response"] != a["reference_response"]:
      flipped += 1
      usual = synthetic.usual_answer(CFG, b["family"], b["question"])
      assert said == usual != b["answer"], i
      assert said in b["reference_response"].split("\\boxed")[0] or (
          b["family"] == "exist"
      )
    wrong_answers += said != b["answer"]
  # A coin of 0.4 on the examples whose answer is not already the usual one
  # (about 0.78 of them): 0.31 expected, sd 0.018 at 700.
  assert 0.25 < flipped / n < 0.37
  assert wrong_answers == flipped
  for split in ("validation", "test"):
    for a, b in zip(
        synthetic.generate(CFG, split, 20),
        synthetic.generate(biased, split, 20),
    ):
      assert a["reference_response"] == b["reference_response"]
      assert a["image"] == b["image"]


def test_reference_styles():
  terse = dataclasses.replace(CFG, reference_style="answer")
  echo = dataclasses.replace(CFG, reference_style="question")
  for a, b, c in zip(
      synthetic.generate(CFG, "train", 7),
      synthetic.generate(terse, "train", 7),
      synthetic.generate(echo, "train", 7),
  ):
    assert a["image"] == b["image"] == c["image"]
    assert a["answer"] == b["answer"] == c["answer"]
    boxed = f"\\boxed{{{a['answer']}}}"
    assert b["reference_response"] == boxed
    assert c["reference_response"] == f"{a['question']} {boxed}"
  with pytest.raises(ValueError, match="reference_style"):
    synthetic.SyntheticConfig(reference_style="essay")
  biased = dataclasses.replace(terse, reference_prior=1.0)
  for r in synthetic.generate(biased, "train", 14):
    usual = synthetic.usual_answer(biased, r["family"], r["question"])
    assert r["reference_response"] == f"\\boxed{{{usual}}}"
