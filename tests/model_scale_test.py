"""The model at scale: scanned + rematerialised layers, fused attention and
float32 masters with bf16 compute, each against the plain computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from faithful_rl import checkpointing
from faithful_rl import models
from faithful_rl import optim
from faithful_rl import steps
from faithful_rl.models import inputs as inputs_lib
import helpers
from helpers import IMAGE


def _batch(config, seed=0):
  """Two left-padded prompts with images of different sizes, plus a probe."""
  rng = np.random.default_rng(seed)
  grids = [[(1, 8, 8)], [(1, 4, 12)]]
  prompts = helpers.image_prompts(rng, grids)
  prompts[0] += helpers.random_text(rng, 6)
  ids, mask = helpers.make_batch(rng, prompts)
  pix = [
      helpers.random_pixels(rng, gs, config.vision.patch_dim) for gs in grids
  ]
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  vis = inputs_lib.vision_inputs(pix, grids, 256, config.vision)
  kpos, kvalid = models.visual_token_positions(jnp.asarray(ids), IMAGE, 16)
  t = ids.shape[1]
  probe = models.AttentionProbe(
      query_positions=jnp.asarray([[t - 1, t - 2], [t - 1, t - 3]], jnp.int32),
      key_positions=kpos,
      key_valid=kvalid,
      layers=(1,),
  )
  targets = jnp.asarray(rng.integers(3, 100, ids.shape), jnp.int32)
  return dict(ids=ids, mask=mask, pos=pos, vis=vis, probe=probe), targets


def _loss(model, batch, targets):
  """A scalar that reads logits at every real position and the probe."""
  out = model(
      batch["ids"],
      attention_mask=batch["mask"],
      position_ids=batch["pos"],
      vision=batch["vis"],
      attention_probe=batch["probe"],
  )
  lp = jax.nn.log_softmax(out.logits)
  nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
  real = jnp.asarray(batch["mask"], jnp.float32)
  return (nll * real).sum() / real.sum() + out.visual_attention[1].sum(), out


def _variant(model, **options):
  """`model`'s parameters under other construction options."""
  other = models.create(model.config, seed=123, **options)
  graphdef, _ = nnx.split(other)
  return nnx.merge(graphdef, nnx.state(model))


def _forward_and_grads(model, batch, targets):
  """Jitted: (logits, the probe's layer-1 attention, grads of `_loss`)."""
  graphdef, state = nnx.split(model)

  def f(state):
    loss, out = _loss(nnx.merge(graphdef, state), batch, targets)
    return loss, (out.logits, out.visual_attention[1])

  (_, (logits, attn)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(
      state
  )
  return np.asarray(logits), np.asarray(attn), grads


@pytest.fixture(scope="module")
def unrolled():
  """The plain model (a Python loop over layers, no remat, masked-softmax
  attention), its batch, and its forward and gradients, computed once."""
  config = helpers.tiny_config()
  base = models.create(config, seed=1, scan_layers=False, remat="none",
                       attention="xla")  # fmt: skip
  batch, targets = _batch(config)
  return base, batch, targets, _forward_and_grads(base, batch, targets)


@pytest.mark.parametrize(
    "options",
    [
        dict(scan_layers=True, remat="full"),
        dict(scan_layers=True, remat="dots"),
        dict(scan_layers=True, remat="none", attention="flash"),
        dict(scan_layers=False, remat="full", attention="flash"),
        dict(scan_layers=True, remat="full", attention="splash"),
    ],
)
def test_scanned_remat_fused_equals_unrolled(options, unrolled):
  base, batch, targets, (logits0, attn0, g0) = unrolled
  logits1, attn1, g1 = _forward_and_grads(
      _variant(base, **options), batch, targets
  )
  real = np.asarray(batch["mask"], bool)
  np.testing.assert_allclose(logits1[real], logits0[real], atol=1e-6)
  np.testing.assert_allclose(attn1, attn0, atol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
    np.testing.assert_allclose(a[...], b[...], atol=1e-5, err_msg=str(path))


def test_scanned_program_does_not_grow_with_depth():
  """The scanned decoder's program is the same size at 2 and 8 layers."""

  def hlo_size(layers, scan):
    config = helpers.tiny_config().replace_text(num_hidden_layers=layers)
    model = models.create(config, scan_layers=scan)
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((1, 16), jnp.int32)
    f = lambda s: nnx.merge(graphdef, s)(ids).logits
    return len(jax.jit(f).lower(state).as_text())

  assert hlo_size(8, True) < 1.05 * hlo_size(2, True)
  assert hlo_size(8, False) > 2 * hlo_size(2, False)


def test_flash_prefill_and_cached_decode_equal_the_full_forward():
  config = helpers.tiny_config()
  model = _variant(models.create(config, seed=2), attention="flash")
  batch, _ = _batch(config, seed=3)
  ids, mask, pos = batch["ids"], batch["mask"], batch["pos"]
  t = ids.shape[1]
  nxt = pos.max(axis=(0, 2)) + 1
  new = np.array([[5, 6], [7, 8]])
  new_pos = np.broadcast_to(nxt[None, :, None] + np.arange(2), (3, 2, 2))
  full = model(
      np.concatenate([ids, new], 1),
      attention_mask=np.concatenate([mask, np.ones_like(new)], 1),
      position_ids=np.concatenate([pos, new_pos], 2),
      vision=batch["vis"],
  ).logits
  kv_mask = np.concatenate([mask, np.zeros((2, 2), mask.dtype)], 1)
  out = model(
      ids,
      attention_mask=kv_mask,
      position_ids=pos,
      vision=batch["vis"],
      cache=models.KVCache.zeros(config.text, 2, t + 2, jnp.float32),
      cache_index=0,
  )
  real = mask.astype(bool)
  np.testing.assert_allclose(out.logits[real], full[:, :t][real], atol=1e-5)
  kv_mask[:, t] = 1
  step = jax.jit(
      lambda m, c, i: model(
          new[:, :1], attention_mask=m, position_ids=new_pos[:, :, :1],
          cache=c, cache_index=i,
      ).logits
  )(kv_mask, out.cache, jnp.int32(t))  # fmt: skip
  np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_bf16_compute_float32_masters_learn_at_lr_1e6(tmp_path):
  """One AdamW step at lr 1e-6 moves every trained weight; bf16 masters
  would keep most entries where they were. The float32 parameters survive
  a checkpoint round trip bitwise."""
  config = helpers.tiny_config(tied=True)
  batch, targets = _batch(config, seed=4)

  def one_step(param_dtype):
    model = models.create(
        config, dtype=jnp.bfloat16, param_dtype=param_dtype, seed=5
    )
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tx = optim.make(params, lr=1e-6, weight_decay=0.1)

    def loss(p):
      out = _loss(nnx.merge(graphdef, p), batch, targets)
      return out[0], out[1].hidden[0, 0, :1]

    @jax.jit
    def step(params):
      (_, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params)
      updates, opt_state = tx.update(grads, tx.init(params), params)
      return optax.apply_updates(params, updates), opt_state, grads, hidden

    new, opt_state, grads, hidden = step(params)
    assert hidden.dtype == jnp.bfloat16  # the compute dtype
    return params, new, opt_state, grads

  def moved(old, new, grads):
    """Per tensor: the fraction of entries with a gradient that moved."""
    out = {}
    for (path, a), b, g in zip(
        jax.tree_util.tree_leaves_with_path(old),
        jax.tree.leaves(new),
        jax.tree.leaves(grads),
    ):
      has_grad = np.asarray(g) != 0
      # Only a key bias has an exactly zero gradient (softmax ignores it).
      assert has_grad.mean() > 0.5, jax.tree_util.keystr(path)
      out[jax.tree_util.keystr(path)] = float(
          np.mean((np.asarray(a) != np.asarray(b))[has_grad])
      )
    return out

  old, new, opt_state, grads = one_step(jnp.float32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
  assert all(f == 1.0 for f in moved(old, new, grads).values()), moved(
      old, new, grads
  )
  assert all(
      x.dtype == jnp.float32
      for x in jax.tree.leaves(opt_state)
      if jnp.issubdtype(x.dtype, jnp.floating)
  )
  old16, new16, _, grads16 = one_step(jnp.bfloat16)
  frac16 = moved(old16, new16, grads16)
  matrices = [f for k, f in frac16.items() if "kernel" in k or "embedding" in k]
  assert np.mean(matrices) < 0.2, frac16  # bf16 weights mostly stay put

  state = steps.TrainState(new, opt_state, jnp.zeros((), jnp.int32))
  ckpts = checkpointing.Checkpoints(str(tmp_path), async_save=False)
  ckpts.save(1, state, {"step": 1})
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state,
  )
  back, _, _ = ckpts.restore(1, abstract)
  ckpts.close()
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(back.params)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_window_layout_pads_partial_windows_by_hand():
  """10 x 14 patches = 5 x 7 tokens; windows of 2 x 2 tokens (16 patches):
  3 x 4 = 12 windows, 192 slots for 140 patches."""
  vcfg = helpers.tiny_config().vision
  assert vcfg.window_patches == 16
  grids = [(1, 10, 14)]
  assert inputs_lib.layout_patches(grids, vcfg) == 192
  layout = inputs_lib.example_vision_layout(grids, 256, vcfg)
  seg = layout["patch_seg"]
  # The first window holds tokens (0,0),(0,1),(1,0),(1,1) = ids 0, 1, 7, 8.
  np.testing.assert_array_equal(
      layout["patch_index"][:16].reshape(4, 4)[:, 0], [0, 4, 28, 32]
  )
  # The last window column holds one token column: 2 real tokens, 2 padding.
  win3 = seg[3 * 16 : 4 * 16].reshape(4, 4)
  np.testing.assert_array_equal(win3[:, 0], [0, 0, -1, -1])
  assert (seg >= 0).sum() == 140 and (seg[192:] == -1).all()
  # Every visual token is restored from its own merged slot.
  slots = layout["merge_restore"][:35]
  np.testing.assert_array_equal(
      layout["patch_index"][slots * 4] // 4, np.arange(35)
  )


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_compute_dtype_copy_computes_bitwise_the_same(family):
  """`in_compute_dtype` stores every floating parameter in bf16 and the
  forward (logits, hidden states, probe) is bitwise the masters' forward:
  every use of a parameter casts it to the compute dtype first."""
  config = (
      helpers.tiny_config() if family == "qwen2_5_vl"
      else helpers.tiny_qwen3_config()
  )  # fmt: skip
  batch, _ = _batch(config, seed=6)
  model = models.create(
      config, dtype=jnp.bfloat16, param_dtype=jnp.float32, seed=7
  )
  copy = model.in_compute_dtype()
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(copy, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  masters = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert masters == {jnp.dtype(jnp.float32)}  # the model itself is kept

  @jax.jit
  def forward(graphdef, state):
    out = nnx.merge(graphdef, state)(
        batch["ids"],
        attention_mask=batch["mask"],
        position_ids=batch["pos"],
        vision=batch["vis"],
        attention_probe=batch["probe"],
    )
    return out.logits, out.hidden, out.visual_attention[1]

  want = forward(*nnx.split(model))
  got = forward(*nnx.split(copy))
  assert np.abs(np.asarray(want[0])).max() > 0
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_unstacked_layers_and_per_layer_caches_equal_the_stacked_model(
    family,
):
  """What the sampler decodes with: the layers unstacked into L modules
  and per-layer caches. The forward (logits, probe; DeepStack for Qwen3-VL),
  the prefill's caches and a decoding step's logits equal the stacked,
  scanned model's."""
  config = (
      helpers.tiny_config() if family == "qwen2_5_vl"
      else helpers.tiny_qwen3_config()
  )  # fmt: skip
  batch, _ = _batch(config, seed=9)
  model = models.create(config, seed=10)
  unstacked = model.with_layers_unstacked()
  assert unstacked.language_model.unstacked
  assert not model.language_model.unstacked  # the model itself is kept
  ids, mask, pos = batch["ids"], batch["mask"], batch["pos"]
  b, t = ids.shape

  def forward(m):
    out = m(ids, attention_mask=mask, position_ids=pos, vision=batch["vis"],
            attention_probe=batch["probe"])  # fmt: skip
    return np.asarray(out.logits), np.asarray(out.visual_attention[1])

  for a, want in zip(forward(unstacked), forward(model)):
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(a, want, atol=1e-6)

  def prefill_and_step(m, per_layer):
    kv_mask = np.concatenate([mask, np.zeros((b, 1), mask.dtype)], 1)
    cache = models.KVCache.zeros(
        config.text, b, t + 1, jnp.float32, per_layer=per_layer
    )
    out = m(ids, attention_mask=kv_mask, position_ids=pos,
            vision=batch["vis"], cache=cache, cache_index=0)  # fmt: skip
    assert out.cache.per_layer == per_layer
    kv_mask[:, t] = 1
    step_pos = np.broadcast_to(pos.max(axis=(0, 2))[None, :, None] + 1,
                               (3, b, 1))  # fmt: skip
    step = jax.jit(
        lambda c: m(np.full((b, 1), 7), attention_mask=kv_mask,
                    position_ids=step_pos, cache=c,
                    cache_index=jnp.int32(t))  # fmt: skip
    )(out.cache)
    assert step.cache.per_layer == per_layer
    stack = lambda x: np.asarray(jnp.stack(x) if per_layer else x)
    return stack(out.cache.k), stack(step.cache.v), np.asarray(step.logits)

  want = prefill_and_step(model, False)
  real = np.asarray(mask, bool)
  keys = lambda k: k[:, :, :, :t].transpose(0, 1, 3, 2, 4)[:, real]
  # The sampler's pairing, and an unstacked model over a stacked cache.
  for per_layer in (True, False):
    got = prefill_and_step(unstacked, per_layer)
    np.testing.assert_allclose(keys(got[0]), keys(want[0]), atol=1e-5)
    np.testing.assert_allclose(got[1][:, :, :, t], want[1][:, :, :, t],
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(got[2], want[2], atol=1e-5)


def test_per_layer_cache_repeats_as_the_stacked_one():
  config = helpers.tiny_config()
  rng = np.random.default_rng(11)
  stacked = models.KVCache.zeros(config.text, 2, 5, jnp.float32)
  stacked = models.KVCache(
      k=jnp.asarray(rng.standard_normal(stacked.k.shape), jnp.float32),
      v=jnp.asarray(rng.standard_normal(stacked.v.shape), jnp.float32),
  )
  per_layer = models.KVCache(k=tuple(stacked.k), v=tuple(stacked.v))
  assert per_layer.per_layer and not stacked.per_layer
  assert (per_layer.rows, per_layer.length) == (stacked.rows, 5) == (2, 5)
  want, got = stacked.repeat(3), per_layer.repeat(3)
  assert got.rows == 6
  np.testing.assert_array_equal(np.stack(got.k), want.k)
  np.testing.assert_array_equal(np.stack(got.v), want.v)
  np.testing.assert_array_equal(want.k[:, 1], stacked.k[:, 0])  # row 0 x3
