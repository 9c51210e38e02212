"""Qwen2.5-VL port: parity with `transformers`, round trips, the probe."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from faithful_rl import models
from faithful_rl.models import inputs as inputs_lib
from faithful_rl.models import layers as layers_lib
from faithful_rl.models import qwen2_5_vl
import helpers
from helpers import IMAGE

TOL = 1e-4  # logits, float32; never relaxed.


def _hf_model(config, seed=0):
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(config.to_hf())
  # Random norms and biases too, so a swapped or dropped tensor shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
  return model.eval()


@pytest.fixture(scope="module", params=["window", "tied"])
def pair(request, tmp_path_factory):
  """(config, HF torch model, our model loaded from its saved folder)."""
  config = helpers.tiny_config(tied=request.param == "tied")
  hf = _hf_model(config)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  return config, hf, path, models.from_pretrained(path)


def _check(ours, ref, mask):
  diff = np.abs(np.asarray(ours.logits) - ref)[np.asarray(mask, bool)]
  assert diff.max() <= TOL, diff.max()


def test_text_only_batch(pair):
  _, hf, _, model = pair
  rng = np.random.default_rng(1)
  ids, mask = helpers.make_batch(
      rng, [helpers.random_text(rng, 9), helpers.random_text(rng, 4)]
  )
  _check(
      model(ids, attention_mask=mask), helpers.hf_logits(hf, ids, mask), mask
  )


def test_one_image(pair):
  _, hf, _, model = pair
  rng = np.random.default_rng(2)
  grids = [[(1, 8, 12)]]
  ids, mask = helpers.make_batch(rng, helpers.image_prompts(rng, grids))
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  out = model(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=thw)
  _check(out, helpers.hf_logits(hf, ids, mask, thw, pix), mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_two_sizes_with_padding(pair, side):
  _, hf, _, model = pair
  rng = np.random.default_rng(3)
  grids = [[(1, 6, 10)], [(1, 12, 4)]]
  prompts = helpers.image_prompts(rng, grids)
  prompts[1] += helpers.random_text(rng, 7)
  ids, mask = helpers.make_batch(rng, prompts, pad_side=side)
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  out = model(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=thw)
  _check(out, helpers.hf_logits(hf, ids, mask, thw, pix), mask)


def test_two_images_in_one_prompt(pair):
  _, hf, _, model = pair
  rng = np.random.default_rng(4)
  grids = [[(1, 6, 6), (1, 10, 4)], [(1, 4, 8)]]
  ids, mask = helpers.make_batch(rng, helpers.image_prompts(rng, grids))
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  out = model(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=thw)
  _check(out, helpers.hf_logits(hf, ids, mask, thw, pix), mask)


def test_vision_tower_and_rope_index(pair):
  config, hf, _, model = pair
  rng = np.random.default_rng(5)
  # 16x20 patches: windows of 4x4 patches leave partial windows at the edge.
  grids = [[(1, 16, 20), (1, 6, 6)], [(1, 10, 4)]]
  ids, mask = helpers.make_batch(rng, helpers.image_prompts(rng, grids))
  thw = np.array([g for gs in grids for g in gs])
  pix = helpers.random_pixels(rng, thw)
  with torch.no_grad():
    ref = hf.model.visual(torch.tensor(pix), grid_thw=torch.tensor(thw))
  ref = ref.pooler_output.numpy()
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 512, config.vision
  )
  out = np.asarray(model.encode_images(vis))
  ours = np.concatenate([out[b][vis.token_valid[b]] for b in range(2)])
  assert np.abs(ours - ref).max() <= 1e-5

  helpers.check_rope_index(hf, ids, mask, grids, config)


def test_round_trip_through_transformers(pair, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration

  config, hf, _, model = pair
  files = models.save_pretrained(
      model, str(tmp_path), dtype=None, max_shard_bytes=200_000
  )
  assert len(files) > 1  # exercises the sharded index
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert set(index["weight_map"].values()) == set(files)
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path))
  rng = np.random.default_rng(6)
  grids = [[(1, 8, 8)]]
  ids, mask = helpers.make_batch(rng, helpers.image_prompts(rng, grids))
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  np.testing.assert_array_equal(
      helpers.hf_logits(back.eval(), ids, mask, thw, pix),
      helpers.hf_logits(hf, ids, mask, thw, pix),
  )
  again = models.from_pretrained(str(tmp_path))
  a = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree.leaves(model)))
  b = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree.leaves(again)))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_orbax_cli_round_trip(pair, tmp_path):
  from faithful_rl.models import convert_hf

  _, _, hf_dir, model = pair
  convert_hf.main(["to-orbax", hf_dir, str(tmp_path / "orbax")])
  convert_hf.main([
      "to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"),
      "--dtype=float32",
  ])  # fmt: skip
  again = models.from_pretrained(str(tmp_path / "hf"))
  for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# The attention probe.
# ---------------------------------------------------------------------------


def _probe_setup(config, seed=7):
  rng = np.random.default_rng(seed)
  grids = [[(1, 8, 8)], [(1, 4, 12)]]
  prompts = helpers.image_prompts(rng, grids)
  prompts[0] += helpers.random_text(rng, 6)
  ids, mask = helpers.make_batch(rng, prompts)
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 256, config.vision
  )
  kpos, kvalid = qwen2_5_vl.visual_token_positions(jnp.asarray(ids), IMAGE, 64)
  t = ids.shape[1]
  qpos = jnp.asarray([[t - 1, t - 3, t - 5], [t - 1, t - 2, t - 4]], jnp.int32)
  probe = models.AttentionProbe(
      query_positions=qpos, key_positions=kpos, key_valid=kvalid, layers=(2,)
  )
  return ids, mask, pos, vis, probe, pix, thw


def _naive_probe(model, ids, mask, pos, vis, probe, layer):
  """Full [B, H, T, T] softmax at `layer`, then the probe's slice."""
  cfg = model.config.text
  x = model.scatter_images(
      model.embed(jnp.asarray(ids)), jnp.asarray(ids), model.encode_images(vis)
  )
  cos, sin = layers_lib.mrope_cos_sin(
      jnp.asarray(pos),
      head_dim=cfg.head_dim,
      theta=cfg.rope_theta,
      section=cfg.mrope_section,
      dtype=x.dtype,
  )
  key_mask = jnp.asarray(mask, bool)
  b, t = ids.shape
  causal = jnp.tril(jnp.ones((t, t), bool))[None] & key_mask[:, None, :]
  for i in range(cfg.num_hidden_layers):
    lyr = model.language_model.layer(i)
    if i == layer:
      h = lyr.input_layernorm(x)
      attn = lyr.self_attn
      q = attn.q_proj(h).reshape(b, t, -1, cfg.head_dim)
      k = attn.k_proj(h).reshape(b, t, -1, cfg.head_dim)
      q = layers_lib.apply_rope(q, cos, sin)
      k = layers_lib.apply_rope(k, cos, sin)
      k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
      logits = jnp.einsum("bthd,bshd->bhts", q, k) * cfg.head_dim**-0.5
      logits = jnp.where(causal[:, None], logits, -jnp.inf)
      full = jax.nn.softmax(logits, axis=-1)  # [B, H, T, T]
      rows = jnp.take_along_axis(
          full, probe.query_positions[:, None, :, None], axis=2
      )
      cols = jnp.take_along_axis(
          rows, probe.key_positions[:, None, None, :], axis=3
      )
      return (cols * probe.key_valid[:, None, None, :]).mean(1), full
    ctx = qwen2_5_vl._Context(
        key_mask=key_mask,
        query_slots=jnp.broadcast_to(jnp.arange(t)[None], (b, t)),
        cache_index=0,
        probe=None,
    )
    x, _, _ = lyr(x, cos, sin, ctx, None)
  raise AssertionError("layer not reached")


def test_probe_equals_naive_slice_and_rows_sum_to_one():
  config = helpers.tiny_config()
  model = models.create(config, seed=3)
  ids, mask, pos, vis, probe, _, _ = _probe_setup(config)
  out = model(
      ids,
      attention_mask=mask,
      position_ids=pos,
      vision=vis,
      attention_probe=probe,
  )
  naive, full = _naive_probe(model, ids, mask, pos, vis, probe, layer=2)
  np.testing.assert_allclose(out.visual_attention[2], naive, atol=1e-6)
  assert out.visual_attention[2].shape == (2, 3, 64)
  # Each full row is a distribution over keys; padding keys get nothing.
  # (Rows of padding queries attend nowhere: they are NaN here.)
  real = jnp.asarray(mask, bool)[:, None, :, None]
  rows = jnp.where(real, full, 0.0)
  np.testing.assert_allclose(
      rows.sum(-1), jnp.broadcast_to(real[..., 0], rows.shape[:-1]), atol=1e-6
  )
  pad_keys = (1 - jnp.asarray(mask))[:, None, None, :]
  assert float(jnp.abs(rows * pad_keys).max()) == 0
  # Visual mass is a part of that distribution.
  mass = out.visual_attention[2].sum(-1)
  assert bool(jnp.all((mass > 0) & (mass < 1)))


def test_probe_per_head_and_full_key_set_sums_to_one():
  config = helpers.tiny_config()
  model = models.create(config, seed=4)
  ids, mask, pos, vis, probe, _, _ = _probe_setup(config)
  t = ids.shape[1]
  all_keys = models.AttentionProbe(
      query_positions=probe.query_positions,
      key_positions=jnp.broadcast_to(jnp.arange(t)[None], (2, t)),
      key_valid=jnp.ones((2, t), bool),
      layers=(0, 2),
      per_head=True,
  )
  out = model(
      ids,
      attention_mask=mask,
      position_ids=pos,
      vision=vis,
      attention_probe=all_keys,
  )
  for layer in (0, 2):
    rows = out.visual_attention[layer]
    assert rows.shape == (2, config.text.num_attention_heads, 3, t)
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-6)


def test_probe_matches_transformers_eager_attentions():
  config = helpers.tiny_config()
  hf = _hf_model(config, seed=11)
  hf.config._attn_implementation = "eager"  # pylint: disable=protected-access
  hf.model.language_model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  ids, mask, pos, vis, probe, pix, thw = _probe_setup(config)
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = models.from_pretrained(d)
  with torch.no_grad():
    attn = (
        hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(pix),
            image_grid_thw=torch.tensor(np.asarray(thw)),
            mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
            output_attentions=True,
        )
        .attentions[2]
        .numpy()
    )  # [B, H, T, T]
  out = model(
      ids,
      attention_mask=mask,
      position_ids=pos,
      vision=vis,
      attention_probe=probe,
  )
  q = np.asarray(probe.query_positions)
  k = np.asarray(probe.key_positions)
  valid = np.asarray(probe.key_valid)
  for b in range(2):
    ref = attn[b][:, q[b]][:, :, k[b]].mean(0) * valid[b]
    np.testing.assert_allclose(out.visual_attention[2][b], ref, atol=1e-6)


def test_probe_gradient_matches_naive():
  from flax import nnx

  config = helpers.tiny_config()
  model = models.create(config, seed=5)
  ids, mask, pos, vis, probe, _, _ = _probe_setup(config)
  w = jax.random.normal(jax.random.key(0), (2, 3, 64))

  def thin(m):
    out = m(
        ids,
        attention_mask=mask,
        position_ids=pos,
        vision=vis,
        attention_probe=probe,
        return_logits=False,
    )
    return jnp.sum(out.visual_attention[2] * w)

  def naive(m):
    return jnp.sum(_naive_probe(m, ids, mask, pos, vis, probe, 2)[0] * w)

  g_thin = nnx.grad(thin)(model)
  g_naive = nnx.grad(naive)(model)
  flat_thin = jax.tree.leaves(g_thin)
  flat_naive = jax.tree.leaves(g_naive)
  total = 0.0
  for a, b in zip(flat_thin, flat_naive):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    total += float(jnp.abs(a).sum())
  assert total > 0  # the probe does reach the parameters


# ---------------------------------------------------------------------------
# KV cache, bf16, bad input.
# ---------------------------------------------------------------------------


def test_cached_decoding_equals_full_forward():
  config = helpers.tiny_config()
  model = models.create(config, seed=6)
  rng = np.random.default_rng(8)
  grids = [[(1, 8, 8)], [(1, 4, 12)]]
  ids, mask = helpers.make_batch(rng, helpers.image_prompts(rng, grids))
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  pos, delta = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(
      *inputs_lib.split_hf_images(ids, pix, thw, config), 256, config.vision
  )
  new = rng.integers(3, 110, size=(2, 4))
  full_ids = np.concatenate([ids, new], 1)
  full_mask = np.concatenate([mask, np.ones_like(new)], 1)
  nxt = pos.max(axis=(0, 2)) + 1
  new_pos = nxt[None, :, None] + np.arange(4)[None, None]
  full_pos = np.concatenate([pos, np.broadcast_to(new_pos, (3, 2, 4))], 2)
  ref = model(
      full_ids, attention_mask=full_mask, position_ids=full_pos, vision=vis
  ).logits

  helpers.check_cached_decoding(model, ids, mask, pos, vis, new, full_pos, ref)
  # rope_deltas give the same decode positions.
  np.testing.assert_array_equal(nxt, mask.sum(1) + delta)


def test_bf16_forward_deviation(pair, capsys):
  _, _, path, model32 = pair
  model16 = models.from_pretrained(path, dtype=jnp.bfloat16)
  rng = np.random.default_rng(9)
  grids = [[(1, 8, 8)], [(1, 4, 12)]]
  ids, mask = helpers.make_batch(rng, helpers.image_prompts(rng, grids))
  thw = [g for gs in grids for g in gs]
  pix = helpers.random_pixels(rng, thw)
  f32 = model32(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=thw)
  b16 = model16(ids, attention_mask=mask, pixel_values=pix, image_grid_thw=thw)
  assert b16.hidden.dtype == jnp.bfloat16
  m = np.asarray(mask, bool)
  diff = np.abs(np.asarray(b16.logits) - np.asarray(f32.logits))[m]
  scale = np.abs(np.asarray(f32.logits))[m].max()
  lp32 = jax.nn.log_softmax(f32.logits)[m]
  lp16 = jax.nn.log_softmax(b16.logits)[m]
  kl = float(jnp.sum(jnp.exp(lp32) * (lp32 - lp16), -1).mean())
  with capsys.disabled():
    print(
        f"\nbf16 vs f32 logits: max|diff|={diff.max():.4f}"
        f" (max|logit|={scale:.2f}), mean KL={kl:.2e}"
    )
  assert np.isfinite(np.asarray(b16.logits)).all()
  assert diff.max() < 0.1 * scale and kl < 1e-2


def test_bad_checkpoints_name_the_file_and_tensor(pair, tmp_path):
  _, _, hf_dir, model = pair
  # Missing shard.
  sharded = tmp_path / "sharded"
  files = models.save_pretrained(
      model, str(sharded), dtype=None, max_shard_bytes=200_000
  )
  os.remove(sharded / files[1])
  with pytest.raises(models.CheckpointError, match=files[1]):
    models.from_pretrained(str(sharded))
  # Unsupported family.
  other = tmp_path / "other"
  other.mkdir()
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  cfg["model_type"] = "llava"
  json.dump(cfg, open(other / "config.json", "w"))
  with pytest.raises(models.CheckpointError, match="config.json.*llava"):
    models.from_pretrained(str(other))
  # A tensor of the wrong shape.
  from faithful_rl.models import safetensors_io

  bad = tmp_path / "bad"
  models.save_pretrained(model, str(bad), dtype=None)
  with safetensors_io.SafetensorsFile(str(bad / "model.safetensors")) as f:
    tensors = [(k, np.array(f.get(k))) for k in f.keys()]
  name = "model.layers.1.self_attn.k_proj.weight"
  tensors = [(k, v[:-1] if k == name else v) for k, v in tensors]
  safetensors_io.save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(
      models.CheckpointError, match=r"model\.safetensors.*k_proj\.weight"
  ):
    models.from_pretrained(str(bad))
  # A missing tensor.
  tensors = [(k, v) for k, v in tensors if k != name]
  safetensors_io.save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(models.CheckpointError, match="missing.*k_proj"):
    models.from_pretrained(str(bad))


def test_image_token_mismatch_is_an_error():
  config = helpers.tiny_config()
  rng = np.random.default_rng(10)
  ids, _ = helpers.make_batch(rng, helpers.image_prompts(rng, [[(1, 8, 8)]]))
  pix = helpers.random_pixels(rng, [(1, 8, 8)])
  with pytest.raises(ValueError, match="example 0"):
    inputs_lib.split_hf_images(ids, pix, [(1, 8, 12)], config)
  with pytest.raises(ValueError, match="bucket"):
    inputs_lib.vision_inputs([pix], [[(1, 8, 8)]], 32, config.vision)


def test_config_round_trips_through_transformers():
  from faithful_rl.models import archs

  for config in (helpers.tiny_config(), *archs.ARCHS.values()):
    back = models.ModelConfig.from_hf(config.to_hf())
    assert back == config
