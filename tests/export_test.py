"""`python -m faithful_rl.export`: a trained run as a HF folder.

Per family, a tiny checkpoint folder as transformers writes it
(`helpers.write_hf_folder`: tokenizer, chat template, the family's
preprocessor_config.json, a generation_config.json) starts a recipe's
`runlocal` run (2 SFT steps, a checkpoint after each, images at the
recipe's training-time pixel bounds, not the folder's); the export of its
workdir loads in transformers with our logits and carries the folder's
files byte for byte.
"""

import filecmp
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import qwen2_5_vl_dapo
from configs import qwen3_vl_dapo
from faithful_rl import checkpointing
from faithful_rl import export
from faithful_rl import models
from faithful_rl import train
from faithful_rl.models import convert_hf
from faithful_rl.models import inputs as inputs_lib
import helpers

RECIPES = {"qwen2_5_vl": qwen2_5_vl_dapo, "qwen3_vl": qwen3_vl_dapo}
CARRIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)


@pytest.fixture(scope="module", params=sorted(RECIPES))
def run(request, tmp_path_factory):
  """(workdir, source folder, graphdef, {step: params}) of a trained run."""
  family = request.param
  source = str(tmp_path_factory.mktemp(f"{family}_source"))
  helpers.write_hf_folder(source, family)
  config = RECIPES[family].get_config(f"runlocal,hf_dir={source}")
  config.stages = ("sft",)
  config.sft.steps = 2
  config.ckpt.every = 1
  config.eval.final_examples = 0
  config.data.eval_split = config.data.test_split = "none"
  workdir = str(tmp_path_factory.mktemp(f"{family}_run"))
  train.train(config, workdir)
  graphdef, state = nnx.split(models.from_pretrained(source))
  target = nnx.to_pure_dict(state)
  saved = {
      s: checkpointing.load_params(workdir, target, step=s) for s in (1, 2)
  }
  return workdir, source, graphdef, saved


def _prompts(c):
  """Two prompts with one image each: (ids, mask, grids, pixels)."""
  rng = np.random.default_rng(0)
  thw = [(1, 8, 8), (1, 4, 6)]
  ids, mask = helpers.make_batch(
      rng,
      [
          helpers.random_text(rng, 3)
          + [c.vision_start_token_id]
          + [c.image_token_id] * (t * h * w // 4)
          + [c.vision_end_token_id]
          + helpers.random_text(rng, 4)
          for t, h, w in thw
      ],
  )
  patch_dim = 3 * c.vision.temporal_patch_size * c.vision.patch_size**2
  return ids, mask, thw, helpers.random_pixels(rng, thw, patch_dim)


@nnx.jit
def _forward(model, ids, mask, pos, vision):
  return model(ids, attention_mask=mask, position_ids=pos, vision=vision).logits


def _ours(model, ids, mask, thw, pix):
  """Our logits over the real tokens (the trainer's padded inputs, one
  compiled forward for every model of a family)."""
  c = model.config
  pos, _ = inputs_lib.rope_index(ids, mask, [[g] for g in thw], c)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, c), 256, c.vision
  )
  return np.asarray(_forward(model, ids, mask, pos, vis))[mask.astype(bool)]


def _theirs(hf_dir, ids, mask, thw, pix):
  """transformers' logits of `hf_dir` over the real tokens."""
  from transformers import AutoModelForImageTextToText

  hf = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
  image_token = hf.config.image_token_id
  logits = helpers.hf_logits(hf, ids, mask, thw, pix, image_token=image_token)
  return logits[mask.astype(bool)]


def test_export_loads_in_transformers_and_carries_the_source_files(
    run, tmp_path
):
  workdir, source, graphdef, saved = run
  out = str(tmp_path / "hf")
  assert (
      export.main([f"--workdir={workdir}", f"--out={out}", "--dtype=float32"])
      == 0
  )
  for name in CARRIED:  # byte for byte: not the run's pixel bounds
    assert os.path.isfile(os.path.join(source, name)), name
    assert filecmp.cmp(
        os.path.join(source, name), os.path.join(out, name), shallow=False
    ), name
  latest = nnx.merge(graphdef, saved[2])  # the default step is the latest
  inputs = _prompts(latest.config)
  theirs = _theirs(out, *inputs)
  np.testing.assert_allclose(_ours(latest, *inputs), theirs, atol=1e-4)
  # Step 1's parameters give other logits: the export is step 2's.
  other = _ours(nnx.merge(graphdef, saved[1]), *inputs)
  assert np.abs(other - theirs).max() > 1e-4
  assert models.read_config(out) == latest.config


def test_step_and_dtype(run, tmp_path):
  workdir, _, _, saved = run
  out = str(tmp_path / "bf16")
  export.export(workdir, out, step=1)  # bfloat16 by default
  again = nnx.to_pure_dict(nnx.state(models.from_pretrained(out)))
  want = jax.tree.map(
      lambda x: np.asarray(x.astype(jax.numpy.bfloat16), np.float32), saved[1]
  )
  jax.tree.map(np.testing.assert_array_equal, again, want)
  assert '"dtype": "bfloat16"' in open(os.path.join(out, "config.json")).read()


def test_clear_errors(run, tmp_path, capsys):
  workdir, source, _, _ = run
  with pytest.raises(export.ExportError, match=r"no checkpoint of step 3;"
                     r" saved steps: \[1, 2\]"):  # fmt: skip
    export.export(workdir, str(tmp_path / "a"), step=3)
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text(open(f"{workdir}/config.json").read())
  with pytest.raises(export.ExportError, match="checkpoints: no checkpoint"):
    export.export(str(empty), str(tmp_path / "b"))
  with pytest.raises(export.ExportError, match="not a training run"):
    export.export(source, str(tmp_path / "c"))  # a HF folder
  assert export.main([f"--workdir={source}", f"--out={tmp_path}/d"]) == 1
  assert "not a training run" in capsys.readouterr().err
  with pytest.raises(export.ExportError, match="--dtype must be one of"):
    export.export(workdir, str(tmp_path / "e"), dtype="float16")
  # convert_hf's to-hf, pointed at a run's checkpoint, names this command.
  with pytest.raises(SystemExit):
    convert_hf.main(["to-hf", f"{workdir}/checkpoints/2", str(tmp_path / "f")])
  assert "python -m faithful_rl.export" in capsys.readouterr().err
  assert not any(os.path.exists(tmp_path / n) for n in "abcdef")
