"""Qwen3-VL checkpoints: the processor against transformers'
Qwen3VLProcessor, boxes on the 32-px token grid, `<Focus>` through
`python -m faithful_rl.models.vocab`, the family read from config.json.

The folder is a tiny Qwen3-VL written by transformers with the demo
tokenizer and Qwen3-VL's image processor settings and chat template
(`helpers.write_hf_folder`).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from faithful_rl import data
from faithful_rl import models
from faithful_rl.data import targets
from faithful_rl.models import vocab
import helpers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("qwen3_vl"))
  helpers.write_hf_folder(path)
  return path


@pytest.fixture(scope="module")
def processor(folder):
  return data.processor_for(folder)


def test_processor_matches_transformers(folder, processor):
  assert processor.model_config.family == "qwen3_vl"
  assert (processor.patch_size, processor.token_pixels) == (16, 32)
  from transformers import Qwen3VLProcessor  # pylint: disable=g-import-not-at-top

  hf = helpers.image_only(Qwen3VLProcessor, processor)
  rng = np.random.default_rng(0)
  image = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  cases = [
      ("How many?", [image(100, 150)]),  # resized to 96 x 160
      ("Which?", [image(300, 260)]),  # down to 256 x 224 (max pixels)
      ("Two?", [image(40, 70), image(130, 97)]),  # up to min pixels
  ]
  for question, images in cases:
    ex = processor(
        {"id": "x", "images": images, "question": question, "answer": "1"}
    )
    prompt = hf.apply_chat_template(
        processor.messages(question, len(images)),
        tokenize=False,
        add_generation_prompt=True,
    )
    ref = hf(
        text=[prompt],
        images=[Image.fromarray(i) for i in images],
        return_tensors="np",
    )
    np.testing.assert_array_equal(ex.prompt_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
    assert ex.pixel_values.shape[1] == 3 * 2 * 16 * 16
    n_img = int((ex.prompt_ids == processor.ids.image_pad).sum())
    assert n_img == ex.num_visual_tokens == ex.num_patches // 4
  assert ex.resized_sizes[0] == (64, 96)
  # No system turn: the template has no default one.
  text = processor.decode(ex.prompt_ids)
  assert text.startswith("<|im_start|>user\n<|vision_start|>")
  assert "system" not in text
  assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
  with_system = data.processor_for(folder, system_prompt="S")
  assert with_system.prompt_text("Q", 0).startswith("<|im_start|>system\nS")


def test_mean_and_std_are_one_half(processor):
  """White is (1 - 0.5) / 0.5 = 1, black -1 (Qwen2.5's CLIP mean/std
  would give 1.93 and -1.79)."""
  white = np.full((64, 64, 3), 255, np.uint8)
  black = np.zeros((64, 64, 3), np.uint8)
  pix, grid = processor.patches([white, black])
  np.testing.assert_array_equal(grid, [[1, 4, 4], [1, 4, 4]])
  np.testing.assert_allclose(pix[:16], 1.0, atol=1e-6)
  np.testing.assert_allclose(pix[16:], -1.0, atol=1e-6)


def test_boxes_map_onto_the_32px_grid(folder):
  """A 96 x 128 image is not resized: 3 x 4 tokens of 32 px. The box
  (x 32-96, y 0-64) covers tokens (0, 1), (0, 2), (1, 1), (1, 2)."""
  proc = data.processor_for(folder, counterfactual_fill="black")
  rng = np.random.default_rng(1)
  image = rng.integers(1, 256, (96, 128, 3), dtype=np.uint8)
  ex = proc({
      "id": "box", "images": [image], "question": "Q?", "answer": "yes",
      "boxes": np.array([[32, 0, 96, 64]], np.float32),
  })  # fmt: skip
  assert ex.resized_sizes == ((96, 128),) and ex.num_visual_tokens == 12
  np.testing.assert_allclose(ex.boxes_tok, [[1, 0, 3, 2]], rtol=1e-6)
  covered = [1, 2, 5, 6]
  np.testing.assert_array_equal(np.flatnonzero(ex.evidence_mask), covered)
  np.testing.assert_allclose(ex.focus_target[covered], 1 / 4)
  np.testing.assert_allclose(ex.ease_target.sum(), 1.0, rtol=1e-6)
  assert ex.ease_target[covered].min() > ex.ease_target.max() / 2
  # The Gaussian's centre (token row 1, column 2 edge) outweighs a corner.
  assert ex.ease_target[5] > ex.ease_target[11]
  changed = (ex.cf_pixel_values != ex.pixel_values).any(-1)
  expect = np.zeros(ex.num_patches, bool)
  for k in covered:  # the 4 patches of each evidence token
    expect[4 * k : 4 * k + 4] = True
  np.testing.assert_array_equal(changed, expect)
  mask = targets.evidence_token_mask(ex.boxes_tok, 3, 4)
  np.testing.assert_array_equal(np.flatnonzero(mask), covered)


def test_vocab_cli_adds_tokens_to_a_qwen3_checkpoint(folder, tmp_path):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from transformers import Qwen3VLForConditionalGeneration  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "grown")
  vocab.main([folder, out, "--tokens=<Focus>,<Look>", "--dtype=float32"])
  tok = AutoTokenizer.from_pretrained(out)
  look = tok.convert_tokens_to_ids("<Look>")
  assert tok.convert_tokens_to_ids("<Focus>") == 7  # already there
  saved = json.load(open(os.path.join(out, "config.json")))
  assert saved["model_type"] == "qwen3_vl"
  before, after = models.from_pretrained(folder), models.from_pretrained(out)
  assert after.config.family == "qwen3_vl"
  assert after.config.text.vocab_size == max(448, look + 1)
  emb = np.asarray(before.language_model.embed_tokens.embedding[...])
  emb2 = np.asarray(after.language_model.embed_tokens.embedding[...])
  np.testing.assert_array_equal(emb2[:look], emb[:look])
  np.testing.assert_allclose(emb2[look], emb[: len(tok) - 1].mean(0), atol=1e-6)
  hf = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
  ids = np.array([[9, look, 7, 12]])
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(
      np.asarray(after(jnp.asarray(ids)).logits), ref, atol=1e-4
  )


def test_from_pretrained_picks_the_family(folder, tmp_path):
  from faithful_rl.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  from faithful_rl.models import qwen3_vl  # pylint: disable=g-import-not-at-top

  assert isinstance(models.from_pretrained(folder), qwen3_vl.Qwen3_VL)
  models.save_pretrained(
      models.create(helpers.tiny_config()), str(tmp_path), dtype=None
  )
  assert isinstance(
      models.from_pretrained(str(tmp_path)), qwen2_5_vl.Qwen2_5_VL
  )


@pytest.mark.slow
def test_runlocal_ease_trains_a_qwen3_checkpoint(folder, tmp_path):
  """`configs/qwen3_vl_ease.py:runlocal,hf_dir=...` through
  `faithful_rl.train`: two RL steps whose loss carries the EASE term (the
  gate off, as a random model earns no reward) and move the decoder."""
  from configs import qwen3_vl_ease  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top

  config = qwen3_vl_ease.get_config(f"runlocal,hf_dir={folder}")
  assert config.model.init == "hf" and config.model.hf_dir == folder
  config.rl.ease.gate = False
  workdir = str(tmp_path / "run")
  results = train.train(config, workdir)
  assert {"init", "rl"} <= set(results)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rl_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in rl_rows] == [1, 2]
  for r in rl_rows:
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert r["ease/gate_coverage"] == 1.0 and r["ease/loss"] > 0
  # 24 of 36 / 2 of 3 layers: the probe read the model's default layer.
  assert 0 < rl_rows[0]["ease/evidence_mass"] < 1
  before = models.from_pretrained(folder)
  step, params = helpers.final_params(workdir)
  assert step == 2
  key = "['language_model']['layers']['mlp']['down_proj']['kernel']"
  start = before.language_model.layers.mlp.down_proj.kernel[...]
  assert np.abs(params[key] - np.asarray(start)).max() > 0
  # The vision tower is frozen (the recipes' optimizer group).
  key = "['visual']['patch_embed']['kernel']"
  start = before.visual.patch_embed.kernel[...]
  np.testing.assert_array_equal(params[key], np.asarray(start))


@pytest.fixture(scope="module")
def step_setup(folder):
  """(graphdef, params, collated batch) of the Qwen3-VL folder on four
  synthetic questions, responses starting with `<Focus>`."""
  import itertools  # pylint: disable=g-import-not-at-top

  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl.data import batching  # pylint: disable=g-import-not-at-top
  from faithful_rl.data import synthetic  # pylint: disable=g-import-not-at-top

  proc = data.processor_for(folder, focus_token=True)
  config = synthetic.SyntheticConfig(families=("attribute", "count"))
  records = itertools.islice(synthetic.generate(config, "train", 4), 4)
  examples = [proc.process(r) for r in records]
  batch = batching.collate(
      examples,
      model_config=proc.model_config,
      buckets=batching.Buckets(prompt=(64,), patches=(64,), response=(16,)),
  ).arrays
  assert batch["has_boxes"].all()
  graphdef, state = nnx.split(models.from_pretrained(folder))
  return graphdef, nnx.to_pure_dict(state), batch, proc


@pytest.mark.slow
def test_anchor_step_on_qwen3(step_setup):
  """The Faithful-MR1 anchor loss (SFT) on Qwen3-VL reads the `<Focus>`
  row at layer floor(2 * 3 / 3) = 2, past the DeepStack layers, and a
  small gradient step lowers it (EASE: the runlocal test above)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from configs import common  # pylint: disable=g-import-not-at-top
  from faithful_rl import sft  # pylint: disable=g-import-not-at-top
  from faithful_rl import steps  # pylint: disable=g-import-not-at-top

  graphdef, params, batch, proc = step_setup
  assert (batch["response_ids"][:, 0] == proc.ids.focus).all()
  image = proc.model_config.image_token_id
  anchor = dict(common.base_config().sft.anchor, enabled=True, weight=1.0)
  cfg = steps.SFTConfig(anchor=steps.AnchorConfig(**anchor))
  b = {k: batch[k] for k in sft.KEYS}
  b["position_ids"] = np.swapaxes(b["position_ids"], 0, 1)
  b = jax.tree.map(jnp.asarray, b)
  totals = sft.sft_totals(jax.tree.map(lambda x: x[None], b), cfg, image)

  def anchor_loss(p):
    _, m = sft.sft_loss(p, graphdef, b, None, cfg, totals)
    return m["anchor/loss"], m

  grad_fn = jax.jit(jax.value_and_grad(anchor_loss, has_aux=True))
  (l0, m0), grads = grad_fn(params)
  assert np.isfinite(float(l0)) and float(l0) > 0 and np.isfinite(m0["ce"])
  norm = optax.global_norm(grads)
  assert float(norm) > 0
  new = jax.tree.map(lambda p, g: p - 0.05 * g / norm, params, grads)
  (l1, _), _ = grad_fn(new)
  assert float(l1) < float(l0)
