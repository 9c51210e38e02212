"""Qwen3.5 port: parity with `transformers`, round trips, probe, decoding.

One random `Qwen3_5ForConditionalGeneration` per config (untied / tied,
`helpers.tiny_qwen3_5_config`: layers linear, full, linear, linear, full;
grouped DeltaNet heads; a quarter of each attention head rotated), saved
with `save_pretrained` and loaded with our `from_pretrained`; float32 on
CPU. Prompts run past the DeltaNet's 64-token chunk, not to a multiple.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from faithful_rl import models
from faithful_rl.models import gated_deltanet
from faithful_rl.models import inputs as inputs_lib
import helpers

TOL = 1e-4  # logits, float32; never relaxed.
PATCH_DIM = 1536  # 3 x 2 x 16 x 16


def _hf_model(config, seed=0):
  from transformers import Qwen3_5ForConditionalGeneration

  torch.manual_seed(seed)
  model = Qwen3_5ForConditionalGeneration(config.to_hf())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norms, biases, A_log, dt_bias, the position table
        one = "linear_attn.norm" in name or "visual" in name and "norm" in name
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if one else 0.0))
      elif p.ndim == 2 and "pos_embed" not in name:
        p.mul_(4.0)
  model.generation_config.eos_token_id = None
  return model.eval()


@pytest.fixture(scope="module", params=["untied", "tied"])
def pair(request, tmp_path_factory):
  """(config, HF torch model, its saved folder, our model loaded from it)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  config = helpers.tiny_qwen3_5_config(tied=request.param == "tied")
  hf = _hf_model(config)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  yield config, hf, path, models.from_pretrained(path)
  torch.set_num_threads(threads)


def _inputs(seed, grids_per_example, pad_side="left", extra=0):
  """(ids, mask, flat grids, HF-packed pixels) of prompts with images."""
  rng = np.random.default_rng(seed)
  prompts = helpers.image_prompts(rng, grids_per_example)
  prompts[-1] += helpers.random_text(rng, extra)
  ids, mask = helpers.make_batch(rng, prompts, pad_side=pad_side)
  thw = [g for gs in grids_per_example for g in gs]
  return ids, mask, thw, helpers.random_pixels(rng, thw, PATCH_DIM)


def _diff(ours, ref, mask):
  real = np.asarray(mask, bool)
  return float(np.abs(np.asarray(ours) - np.asarray(ref))[real].max())


@nnx.jit
def _forward(model, ids, mask, pos, vision):
  return model(ids, attention_mask=mask, position_ids=pos, vision=vision).logits


# ---------------------------------------------------------------------------
# The Gated DeltaNet's two forms.
# ---------------------------------------------------------------------------


def test_chunked_delta_rule_equals_the_token_by_token_recurrence():
  """Over 150 tokens (two full chunks of 64 and a partial one), from a
  nonzero state; and the state it ends in continues the sequence."""
  rng = np.random.default_rng(0)
  b, t, h, dk, dv = 2, 150, 3, 8, 5
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q = gated_deltanet.l2norm(normal(b, t, h, dk))
  k = gated_deltanet.l2norm(normal(b, t, h, dk))
  v = normal(b, t, h, dv)
  g = -jax.nn.softplus(normal(b, t, h))
  beta = jax.nn.sigmoid(normal(b, t, h))
  s0 = normal(b, h, dk, dv)
  chunk = jax.jit(gated_deltanet.chunk_gated_delta_rule)
  chunked = chunk(q, k, v, g, beta, s0)
  stepped = jax.jit(gated_deltanet.recurrent_gated_delta_rule)(
      q, k, v, g, beta, s0
  )
  for ours, ref in zip(chunked, stepped):
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
  cut = 100  # prefix chunked, the rest continued from its state
  head = chunk(*(x[:, :cut] for x in (q, k, v, g, beta)), s0)
  tail = chunk(*(x[:, cut:] for x in (q, k, v, g, beta)), head[1])
  np.testing.assert_allclose(
      jnp.concatenate([head[0], tail[0]], 1), stepped[0], atol=2e-5
  )


# ---------------------------------------------------------------------------
# Logits against transformers.
# ---------------------------------------------------------------------------


def test_text_only_batch_past_the_chunk(pair):
  _, hf, _, model = pair
  rng = np.random.default_rng(1)
  ids, mask = helpers.make_batch(
      rng, [helpers.random_text(rng, 75), helpers.random_text(rng, 30)]
  )
  ref = helpers.hf_logits(hf, ids, mask)
  assert _diff(_forward(model, ids, mask, None, None), ref, mask) <= TOL


CASES = {
    # 8 x 12 patches: the 6 x 6 position table is up-sampled.
    "one_image": ([[(1, 8, 12)]], "left", 5),
    # Three images of three sizes, left padded, 104 tokens (> 64, the
    # DeltaNet's chunk).
    "several_sizes_left_padded": (
        [[(1, 8, 12), (1, 4, 4)], [(1, 6, 10)]],
        "left",
        50,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_images(pair, case):
  config, hf, _, model = pair
  grids, side, extra = CASES[case]
  ids, mask, thw, pix = _inputs(2, grids, side, extra=extra)
  ref = helpers.hf_logits(hf, ids, mask, thw, pix)
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 256, config.vision
  )
  assert _diff(_forward(model, ids, mask, pos, vis), ref, mask) <= TOL
