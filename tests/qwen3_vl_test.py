"""Qwen3-VL port: parity with `transformers`, round trips, probe, decoding.

One random `Qwen3VLForConditionalGeneration` per config (untied / tied,
`helpers.tiny_qwen3_config`: DeepStack into decoder layers 0 and 1 but not
2, head_dim != hidden / heads, a 6 x 6 position table), saved with
`save_pretrained` and loaded with our `from_pretrained`; float32 on CPU.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from faithful_rl import models
from faithful_rl import rollout
from faithful_rl.models import convert_hf
from faithful_rl.models import inputs as inputs_lib
from faithful_rl.models import layers as layers_lib
from faithful_rl.models import safetensors_io
from faithful_rl.models import vlm
import helpers
from helpers import IMAGE
from helpers import PAD

TOL = 1e-4  # logits, float32; never relaxed.
PATCH_DIM = 1536  # 3 x 2 x 16 x 16
# Scaled-up matrices (as tests/rollout_test.py): greedy continuations that
# depend on the images, and DeepStack features as large as the tokens.
INIT_SCALES = (
    ("language_model.embed_tokens", 25.0),
    ("language_model.", 4.0),
    ("linear_fc2", 20.0),
    ("lm_head", 12.0),
)


def _hf_model(config, seed=0):
  from transformers import Qwen3VLForConditionalGeneration

  torch.manual_seed(seed)
  model = Qwen3VLForConditionalGeneration(config.to_hf())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "pos_embed" in name:
        one = "norm" in name and name.endswith("weight")
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if one else 0.0))
      elif p.ndim == 2:
        p.mul_(next((s for k, s in INIT_SCALES if k in name), 1.0))
  model.generation_config.eos_token_id = None
  return model.eval()


def _pair(head, tmp_path_factory):
  """(config, HF torch model, its saved folder, our model loaded from it)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  config = helpers.tiny_qwen3_config(tied=head == "tied")
  hf = _hf_model(config)
  path = str(tmp_path_factory.mktemp(head))
  hf.save_pretrained(path)
  yield config, hf, path, models.from_pretrained(path)
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  """The untied head's pair: the tests one config suffices for."""
  yield from _pair("untied", tmp_path_factory)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  yield from _pair("tied", tmp_path_factory)


@pytest.fixture(params=["untied", "tied"])
def pair(request):
  """Both heads' pairs, for the tests both must pass."""
  return request.getfixturevalue(request.param)


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
def _forward(model, ids, mask, pos, vision, image_embeds=None):
  return model(
      ids,
      attention_mask=mask,
      position_ids=pos,
      vision=vision,
      image_embeds=image_embeds,
  ).logits


# ---------------------------------------------------------------------------
# Logits against transformers.
# ---------------------------------------------------------------------------


def test_text_only_batch(pair):
  _, hf, _, model = pair
  rng = np.random.default_rng(1)
  ids, mask = helpers.make_batch(
      rng, [helpers.random_text(rng, 9), helpers.random_text(rng, 4)]
  )
  ref = helpers.hf_logits(hf, ids, mask)
  assert _diff(model(ids, attention_mask=mask).logits, ref, mask) <= TOL


CASES = {
    # 8 x 12 patches: the 6 x 6 position table is up-sampled.
    "one_image": ([[(1, 8, 12)]], "left"),
    "two_sizes_left_padded": ([[(1, 6, 10)], [(1, 12, 4)]], "left"),
    "two_sizes_right_padded": ([[(1, 6, 10)], [(1, 12, 4)]], "right"),
    # 4 x 4 patches: the table is down-sampled.
    "two_images_in_one_prompt": (
        [[(1, 4, 4), (1, 10, 8)], [(1, 4, 8)]],
        "left",
    ),
}


TIED_CASES = ("one_image", "two_sizes_left_padded")


# The tied head: two cases suffice.
@pytest.mark.parametrize(
    "head,case",
    [("untied", c) for c in sorted(CASES)] + [("tied", c) for c in TIED_CASES],
)
def test_images(request, head, case):
  config, hf, _, model = request.getfixturevalue(head)
  grids, side = CASES[case]
  ids, mask, thw, pix = _inputs(2, grids, side, extra=5)
  ref = helpers.hf_logits(hf, ids, mask, thw, pix)
  if case == "one_image":  # HF-style inputs, unjitted
    out = model(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=thw)
    logits = out.logits
  else:  # the padded inputs the trainer builds, jitted (3x faster here)
    pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
    vis = inputs_lib.vision_inputs(
        *inputs_lib.split_hf_images(ids, pix, thw, config), 256, config.vision
    )
    logits = _forward(model, ids, mask, pos, vis)
  assert _diff(logits, ref, mask) <= TOL


def test_vision_tower_deepstack_and_rope_index(untied):
  config, hf, _, model = untied
  grids = [[(1, 4, 4), (1, 10, 8)], [(1, 6, 10)]]
  ids, mask, thw, pix = _inputs(5, grids)
  with torch.no_grad():
    ref = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(thw))
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 256, config.vision
  )
  tokens, features = jax.jit(model.vision_features)(vis)
  valid = vis.token_valid
  flat = lambda x: np.concatenate([np.asarray(x[b])[valid[b]] for b in (0, 1)])
  assert np.abs(flat(tokens) - ref.pooler_output.numpy()).max() <= 1e-5
  assert len(ref.deepstack_features) == features.shape[0] == 2
  for ours, theirs in zip(features, ref.deepstack_features):
    assert np.abs(flat(ours) - theirs.numpy()).max() <= 1e-5

  pos = helpers.check_rope_index(hf, ids, mask, grids, config)
  assert (pos[0] != pos[1]).any()  # truly 3-D on the image tokens


def test_deepstack_and_interleaving_change_image_logits_only(untied):
  """The two features other ports dropped: parity above would catch both."""
  config, hf, _, model = untied
  ids, mask, thw, pix = _inputs(6, [[(1, 8, 12)]], extra=4)
  ref = helpers.hf_logits(hf, ids, mask, thw, pix)
  grids = [thw]
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs([pix], grids, 128, config.vision)
  tokens, features = model.vision_features(vis)
  dropped = _forward(model, ids, mask, pos, None, (tokens, 0 * features))
  assert _diff(dropped, ref, mask) > 100 * TOL
  graphdef, state = nnx.split(model)
  chunked_cfg = config.replace_text(mrope_interleaved=False)
  chunked = nnx.merge(
      nnx.split(models.create(chunked_cfg))[0], nnx.state(model)
  )
  assert _diff(_forward(chunked, ids, mask, pos, vis), ref, mask) > 100 * TOL
  # On text alone all three position axes agree: chunked == interleaved.
  text = np.broadcast_to(np.arange(ids.shape[1])[None, None], pos.shape)
  np.testing.assert_allclose(
      _forward(chunked, ids, mask, text, None),
      _forward(nnx.merge(graphdef, state), ids, mask, text, None),
      atol=1e-5,
  )


# ---------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------


def _tensors(folder):
  out = {}
  for fname in convert_hf.weight_files(folder):
    with safetensors_io.SafetensorsFile(os.path.join(folder, fname)) as f:
      out.update({k: np.array(f.get(k)) for k in f.keys()})
  return out


def test_round_trips_through_transformers(pair, tmp_path):
  from transformers import Qwen3VLForConditionalGeneration

  config, hf, hf_dir, model = pair
  files = models.save_pretrained(
      model, str(tmp_path), dtype=None, max_shard_bytes=200_000
  )
  assert len(files) > 1  # exercises the sharded index
  # HF folder -> ours -> HF folder: the very tensors, names and layout.
  ours, theirs = _tensors(str(tmp_path)), _tensors(hf_dir)
  assert sorted(ours) == sorted(theirs)
  assert ("lm_head.weight" in ours) != config.text.tie_word_embeddings
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["model_type"] == "qwen3_vl"
  assert saved["tie_word_embeddings"] == config.text.tie_word_embeddings
  # Ours -> HF folder -> transformers: the same logits.
  back = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids, mask, thw, pix = _inputs(7, [[(1, 8, 8)]])
  np.testing.assert_array_equal(
      helpers.hf_logits(back, ids, mask, thw, pix),
      helpers.hf_logits(hf, ids, mask, thw, pix),
  )


def test_orbax_cli_round_trip(untied, tmp_path):
  config, _, hf_dir, model = untied
  convert_hf.main(["to-orbax", hf_dir, str(tmp_path / "orbax")])
  convert_hf.main([
      "to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"),
      "--dtype=float32",
  ])  # fmt: skip
  again = models.from_pretrained(str(tmp_path / "hf"))
  assert again.config == config
  for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_round_trips_through_transformers():
  from faithful_rl.models import archs

  qwen3 = [c for c in archs.ARCHS.values() if c.family == "qwen3_vl"]
  assert len(qwen3) >= 3
  for config in (helpers.tiny_qwen3_config(), *qwen3):
    assert models.ModelConfig.from_hf(config.to_hf()) == config


# ---------------------------------------------------------------------------
# The probe, the KV cache, greedy rollout.
# ---------------------------------------------------------------------------


def _probe_setup(config, layers=(1, 2)):
  grids = [[(1, 8, 8)], [(1, 4, 12)]]
  ids, mask, thw, pix = _inputs(8, grids, extra=6)
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 128, config.vision
  )
  kpos, kvalid = models.visual_token_positions(jnp.asarray(ids), IMAGE, 16)
  t = ids.shape[1]
  probe = models.AttentionProbe(
      query_positions=jnp.asarray(
          [[t - 1, t - 3, t - 5], [t - 1, t - 2, t - 4]], jnp.int32
      ),
      key_positions=kpos,
      key_valid=kvalid,
      layers=layers,
  )
  return ids, mask, thw, pix, pos, vis, probe


def _naive_probe(model, ids, mask, pos, vis, probe, layer):
  """The full [B, H, T, T] softmax at `layer`, then the probe's slice."""
  cfg = model.config.text
  tokens, features = model.vision_features(vis)
  x = model.scatter_images(model.embed(jnp.asarray(ids)), ids, tokens)
  slots = model.visual_slots(jnp.asarray(ids))
  cos, sin = layers_lib.mrope_cos_sin(
      jnp.asarray(pos),
      head_dim=cfg.head_dim,
      theta=cfg.rope_theta,
      section=cfg.mrope_section,
      dtype=x.dtype,
      interleaved=True,
  )
  key_mask = jnp.asarray(mask, bool)
  b, t = ids.shape
  causal = jnp.tril(jnp.ones((t, t), bool))[None] & key_mask[:, None, :]
  ctx = vlm.Context(
      key_mask=key_mask,
      query_slots=jnp.broadcast_to(jnp.arange(t)[None], (b, t)),
      cache_index=0,
      probe=None,
  )
  for i in range(layer + 1):
    lyr = model.language_model.layer(i)
    if i == layer:
      q, k = lyr.self_attn.qk(lyr.input_layernorm(x), cos, sin)
      k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
      logits = jnp.einsum("bthd,bshd->bhts", q, k) * cfg.head_dim**-0.5
      full = jax.nn.softmax(jnp.where(causal[:, None], logits, -jnp.inf), -1)
      rows = jnp.take_along_axis(
          full, probe.query_positions[:, None, :, None], axis=2
      )
      cols = jnp.take_along_axis(
          rows, probe.key_positions[:, None, None, :], axis=3
      )
      return (cols * probe.key_valid[:, None, None, :]).mean(1)
    x, _, _ = lyr(x, cos, sin, ctx, None)
    if i < features.shape[0]:  # DeepStack, by hand
      gathered = jnp.take_along_axis(features[i], slots[1][..., None], axis=1)
      x = x + jnp.where(slots[0][..., None], gathered, 0)


def test_probe_matches_naive_slice_and_transformers_eager(untied):
  """At layer 1 (fed by DeepStack) and layer 2 (not)."""
  config, hf, _, model = untied
  ids, mask, thw, pix, pos, vis, probe = _probe_setup(config)
  hf.config._attn_implementation = "eager"  # pylint: disable=protected-access
  hf.model.language_model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  try:
    ref = helpers.hf_forward(hf, ids, mask, thw, pix, output_attentions=True)
  finally:
    hf.config._attn_implementation = "sdpa"  # pylint: disable=protected-access
    hf.model.language_model.config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  out = model(
      ids,
      attention_mask=mask,
      position_ids=pos,
      vision=vis,
      attention_probe=probe,
  )
  # The probed layers run outside the scan: DeepStack still reaches them.
  assert _diff(out.logits, ref.logits.numpy(), mask) <= TOL
  q, k = np.asarray(probe.query_positions), np.asarray(probe.key_positions)
  valid = np.asarray(probe.key_valid)
  for layer in (1, 2):
    naive = _naive_probe(model, ids, mask, pos, vis, probe, layer)
    np.testing.assert_allclose(out.visual_attention[layer], naive, atol=1e-6)
    attn = ref.attentions[layer].numpy()  # [B, H, T, T]
    for b in range(2):
      want = attn[b][:, q[b]][:, :, k[b]].mean(0) * valid[b]
      np.testing.assert_allclose(
          out.visual_attention[layer][b], want, atol=1e-6
      )


def test_cached_decoding_equals_full_forward(untied):
  config, _, _, model = untied
  grids = [[(1, 8, 8)], [(1, 4, 12)]]
  ids, mask, thw, pix = _inputs(9, grids)
  pos, delta = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 128, config.vision
  )
  rng = np.random.default_rng(10)
  new = rng.integers(3, 110, size=(2, 3))
  full_ids = np.concatenate([ids, new], 1)
  full_mask = np.concatenate([mask, np.ones_like(new)], 1)
  nxt = mask.sum(1) + delta
  new_pos = np.broadcast_to(nxt[None, :, None] + np.arange(3), (3, 2, 3))
  full_pos = np.concatenate([pos, new_pos], 2)
  ref = _forward(model, full_ids, full_mask, full_pos, vis)
  helpers.check_cached_decoding(model, ids, mask, pos, vis, new, full_pos, ref)


def test_greedy_rollout_equals_transformers_generate(untied):
  config, hf, _, model = untied
  grids = [[(1, 8, 12)], [(1, 6, 6)]]
  ids, mask, thw, pix = _inputs(11, grids, extra=4)
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 128, config.vision
  )
  r = 32
  with torch.no_grad():
    ref = hf.generate(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(pix),
        image_grid_thw=torch.tensor(np.asarray(thw)),
        mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
        max_new_tokens=r,
        do_sample=False,
        pad_token_id=PAD,
    )[:, ids.shape[1] :].numpy()
  batch = dict(
      prompt_ids=ids.astype(np.int32),
      prompt_mask=mask.astype(bool),
      position_ids=pos,
      vision=vis,
  )
  sampling = rollout.SamplingConfig(max_new_tokens=r, greedy=True,
                                    pad_token=PAD)  # fmt: skip
  out = rollout.Engine().sample(model, batch, jax.random.key(0), sampling)
  np.testing.assert_array_equal(out.tokens, ref)
  assert len(set(ref[0].tolist())) > 2  # not a degenerate cycle


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_bad_input_names_the_problem(untied, tmp_path):
  config, _, hf_dir, model = untied
  vis = inputs_lib.vision_inputs(
      [helpers.random_pixels(np.random.default_rng(0), [(1, 4, 4)], PATCH_DIM)],
      [[(1, 4, 4)]],
      64,
      config.vision,
  )
  ids = np.asarray([[3] + helpers.image_tokens((1, 4, 4)) + [4]])
  pos, _ = inputs_lib.rope_index(ids, None, [[(1, 4, 4)]], config)
  with pytest.raises(ValueError, match="DeepStack"):
    model(ids, position_ids=pos, image_embeds=model.encode_images(vis))
  with pytest.raises(ValueError, match="Qwen3VisionConfig"):
    config.replace(family="qwen2_5_vl")
  # A missing q_norm tensor is named, with the folder.
  bad = tmp_path / "bad"
  models.save_pretrained(model, str(bad), dtype=None)
  name = "model.language_model.layers.2.self_attn.q_norm.weight"
  tensors = [(k, v) for k, v in _tensors(str(bad)).items() if k != name]
  safetensors_io.save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(models.CheckpointError, match="missing.*q_norm"):
    models.from_pretrained(str(bad))
  # The MoE family is refused by name.
  moe = tmp_path / "moe"
  moe.mkdir()
  raw = json.load(open(os.path.join(hf_dir, "config.json")))
  json.dump(
      dict(raw, model_type="qwen3_vl_moe"), open(moe / "config.json", "w")
  )
  with pytest.raises(models.CheckpointError, match="config.json.*MoE"):
    models.from_pretrained(str(moe))
