"""The processor against transformers' Qwen2_5_VLProcessor, and its targets."""

import io

import numpy as np
from PIL import Image
import pytest

from faithful_rl import data
from faithful_rl.data import synthetic
from faithful_rl.data import targets
import helpers


@pytest.fixture(scope="module")
def processor():
  return data.processor_for(data.demo_tokenizer_dir())


@pytest.fixture(scope="module")
def hf_processor(processor):
  from transformers import Qwen2_5_VLProcessor  # pylint: disable=g-import-not-at-top

  return helpers.image_only(Qwen2_5_VLProcessor, processor)


def png(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def random_image(rng, width, height, low=0):
  return rng.integers(low, 256, size=(height, width, 3), dtype=np.uint8)


def test_matches_transformers_processor(processor, hf_processor):
  rng = np.random.default_rng(0)
  synthetic_rec = next(
      synthetic.generate(synthetic.SyntheticConfig(), "test", 1)
  )
  cases = [
      (synthetic_rec["question"], [synthetic_rec["image"]]),
      ("How many?", [png(random_image(rng, 100, 80))]),  # upscaled
      ("Which?", [png(random_image(rng, 300, 260))]),  # downscaled
      (
          "Two?",
          [png(random_image(rng, 150, 97)), png(random_image(rng, 112, 224))],
      ),
  ]
  for question, images in cases:
    ex = processor(
        {"id": "x", "images": images, "question": question, "answer": "1"}
    )
    pil = [Image.open(io.BytesIO(b)) for b in images]
    prompt = hf_processor.apply_chat_template(
        processor.messages(question, len(images)),
        tokenize=False,
        add_generation_prompt=True,
    )
    ref = hf_processor(text=[prompt], images=pil, return_tensors="np")
    np.testing.assert_array_equal(ex.prompt_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
    assert ex.pixel_values.dtype == np.float32
    n_img = int((ex.prompt_ids == processor.ids.image_pad).sum())
    assert n_img == ex.num_visual_tokens == ex.num_patches // 4
  # The prompt: Qwen's default system message, the question, the instruction.
  text = processor.decode(ex.prompt_ids)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
  assert text.endswith(
      "Two?\nPut the final answer in \\boxed{}.<|im_end|>\n"
      "<|im_start|>assistant\n"
  )


def test_example_targets_and_counterfactual_patches(processor):
  rng = np.random.default_rng(1)
  first = random_image(rng, 112, 112, low=1)
  second = random_image(rng, 100, 80, low=1)  # resized to 140 x 112: 4x5
  opts = dict(counterfactual_fill="black")
  proc = data.processor_for(data.demo_tokenizer_dir(), **opts)
  rec = {
      "id": "two",
      "images": [png(first), png(second)],
      "question": "Q?",
      "answer": "yes",
      "boxes": np.array([[20, 16, 60, 48]], np.float32),
      "box_image": 1,
  }
  ex = proc(rec)
  assert ex.resized_sizes == ((112, 112), (112, 140))
  assert ex.num_visual_tokens == 16 + 20 and ex.has_boxes
  covered = {16 + k for k in (1, 2, 6, 7, 11, 12)}
  assert set(np.flatnonzero(ex.evidence_mask)) == covered
  np.testing.assert_allclose(ex.focus_target[sorted(covered)], 1 / 6)
  for t in (ex.ease_target, ex.focus_target):
    np.testing.assert_allclose(t.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ex.boxes_tok, [[1, 0.8, 3, 2.4]], rtol=1e-6)
  # Black fill on pixels >= 1: exactly the 4 patches of each evidence token
  # change (patches come in merge groups of 4, one group per token).
  changed = (ex.cf_pixel_values != ex.pixel_values).any(-1)
  expect = np.zeros(ex.num_patches, bool)
  for k in covered:
    expect[4 * k : 4 * k + 4] = True
  np.testing.assert_array_equal(changed, expect)
  assert ex.answer_type == "yes_no"
  # Every fill: the counterfactual patches are HF's patches of the whole
  # masked image (the processor only re-patchifies the masked cells).
  mask = targets.evidence_token_mask(ex.boxes_tok, 4, 5)
  for fill in targets.FILLS:
    proc = data.processor_for(
        data.demo_tokenizer_dir(), counterfactual_fill=fill
    )
    cf = targets.counterfactual_image(proc.resize(png(second)), mask, fill)
    expect, _ = proc.patches([first, cf])
    np.testing.assert_array_equal(proc(rec).cf_pixel_values, expect)


def test_response_ids_focus_token_and_options(processor):
  rec = next(synthetic.generate(synthetic.SyntheticConfig(), "train", 1))
  ex = processor(rec)
  assert ex.response_ids[-1] == processor.ids.im_end
  assert processor.decode(ex.response_ids) == (
      rec["reference_response"] + "<|im_end|>"
  )
  focus = data.processor_for({
      "hf_dir": data.demo_tokenizer_dir(),
      "focus_token": True,
      "system_prompt": "Be brief.",
  })
  fx = focus(rec)
  assert fx.response_ids[0] == focus.ids.focus == 7
  np.testing.assert_array_equal(fx.response_ids[1:], ex.response_ids)
  assert focus.response_prefix_ids == [7]
  assert "Be brief." in focus.decode(fx.prompt_ids)
  assert "helpful" not in focus.decode(fx.prompt_ids)
  # Without a reference response the target is the boxed answer.
  bare = dict(rec, reference_response=b"")
  assert processor.decode(processor(bare).response_ids) == (
      f"\\boxed{{{rec['answer']}}}<|im_end|>"
  )


def test_model_config_must_match_the_tokenizer():
  good = (
      helpers.tiny_config()
      .replace(
          **data.special_token_ids(
              data.processor_for(data.demo_tokenizer_dir()).tokenizer
          ).model_config_kwargs()
      )
      .replace_text(vocab_size=448)
  )
  data.processor_for(data.demo_tokenizer_dir(), model_config=good)
  with pytest.raises(ValueError, match="image_token_id"):
    data.processor_for(
        data.demo_tokenizer_dir(), model_config=helpers.tiny_config()
    )


def test_bad_box_raises_naming_the_record(processor):
  rec = next(synthetic.generate(synthetic.SyntheticConfig(), "train", 1))
  rec = dict(rec, id="bad-7", boxes=np.array([[30, 10, 20, 50]], np.float32))
  with pytest.raises(targets.BoxError, match="bad-7"):
    processor(rec)


def test_demo_examples_fit_the_smallest_buckets():
  # 112-px images: 16 visual tokens; every family's prompt fits 64 tokens
  # and its reference response (with <Focus>) 32 tokens.
  proc = data.processor_for(data.demo_tokenizer_dir(), focus_token=True)
  cfg = synthetic.SyntheticConfig()
  for rec in synthetic.generate(cfg, "validation", 70):
    ex = proc(rec)
    assert ex.num_visual_tokens == 16
    assert len(ex.prompt_ids) <= 64 and len(ex.response_ids) <= 32, rec["id"]
