"""The jitted losses and the update step, on real processed batches and a
tiny model: gradient accumulation is exact, EASE's gate and direction."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from configs import demo
from faithful_rl import forward
from faithful_rl import models
from faithful_rl import rl
from faithful_rl import sft
from faithful_rl import steps
from faithful_rl import train
from faithful_rl.data import batching
from faithful_rl.data import synthetic
from faithful_rl.rl import loss as rl_loss


@pytest.fixture(scope="module")
def setup():
  config = demo.get_config("runlocal")
  config.data.processor.focus_token = True
  processor = train.make_processor(config)
  model_config = train.model_config_for(config, processor)
  processor = train.make_processor(config, model_config)
  records = list(
      itertools.islice(
          synthetic.generate(
              synthetic.SyntheticConfig(families=("attribute", "count")),
              "train",
              4,
          ),
          4,
      )
  )
  examples = [processor.process(r) for r in records]
  batch = batching.collate(
      examples,
      model_config=model_config,
      buckets=batching.Buckets(prompt=(64,), patches=(64,), response=(16,)),
  ).arrays
  model = models.create(model_config, seed=0)
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state), batch, processor


def rl_config(**overrides):
  """The base config's RL settings with `overrides` (sub-blocks as dicts)."""
  return steps.RLConfig.from_config(common.base_config().rl, **overrides)


def rollout_batch(batch, g, rewards, rng, r=8, lengths=None, advantages=None):
  """A RolloutBatch over the collated prompts: random tokens, G rows each."""
  b = batch["prompt_ids"].shape[0]
  n = b * g
  lengths = np.full((n,), r) if lengths is None else np.asarray(lengths)
  rewards = np.asarray(rewards, np.float32)
  return rl.RolloutBatch(
      prompt_ids=batch["prompt_ids"],
      prompt_mask=batch["prompt_mask"],
      position_ids=np.swapaxes(batch["position_ids"], 0, 1),
      vision=batch["vision"],
      cf_vision=None,
      ease_target=batch["ease_target"],
      evidence_mask=batch["evidence_mask"],
      has_boxes=batch["has_boxes"],
      group_ids=np.arange(b, dtype=np.int32),
      tokens=rng.integers(10, 300, (n, r)).astype(np.int32),
      mask=np.arange(r)[None] < lengths[:, None],
      old_logp=rng.uniform(-3.0, -1.0, (n, r)).astype(np.float32),
      ref_logp=rng.uniform(-3.0, -1.0, (n, r)).astype(np.float32),
      token_weights=np.ones((n, r), np.float32),
      advantages=np.zeros((n,), np.float32)
      if advantages is None
      else np.asarray(advantages, np.float32),
      rewards=rewards,
      correct=rewards,
      correct_cf=None,
      truncated=np.zeros((n,), bool),
      row_ids=np.arange(n, dtype=np.int32),
  )


def _dev(tree):
  return jax.tree.map(jnp.asarray, tree)


def loss_of(params, graphdef, batch, cfg, rng=None):
  """rl_loss of one batch normalised by its own totals."""
  rng = jax.random.key(0) if rng is None else rng
  image = nnx.merge(graphdef, params).config.image_token_id
  totals = rl_loss.rl_totals(batch, cfg, image)
  return rl_loss.rl_loss(params, graphdef, batch, rng, cfg, totals)


def test_anchor_loss_reads_exactly_the_focus_row(setup):
  graphdef, params, batch, processor = setup
  anchor = dict(common.base_config().sft.anchor, enabled=True, weight=1.0)
  cfg = steps.SFTConfig(anchor=steps.AnchorConfig(**anchor))
  assert (batch["response_ids"][:, 0] == processor.ids.focus).all()

  def anchor_metrics(b):
    b = {k: b[k] for k in sft.KEYS}
    b["position_ids"] = np.swapaxes(b["position_ids"], 0, 1)
    b = _dev(b)
    image = nnx.merge(graphdef, params).config.image_token_id
    totals = sft.sft_totals(jax.tree.map(lambda x: x[None], b), cfg, image)
    return sft.sft_loss(params, graphdef, b, None, cfg, totals)[1]

  m = anchor_metrics(batch)
  # Later response tokens cannot change the <Focus> row (causal), but they
  # change the cross-entropy.
  other = dict(batch)
  other["response_ids"] = batch["response_ids"].copy()
  other["response_ids"][:, 2:] = (other["response_ids"][:, 2:] + 7) % 300 + 10
  m2 = anchor_metrics(other)
  assert float(m2["anchor/loss"]) == float(m["anchor/loss"])
  assert float(m2["ce"]) != float(m["ce"])
  # A different focus target does change it.
  moved = dict(batch)
  moved["focus_target"] = np.roll(batch["focus_target"], 3, axis=1)
  m3 = anchor_metrics(moved)
  assert float(m3["anchor/loss"]) != float(m["anchor/loss"])
  assert np.isfinite(float(m["anchor/loss"])) and float(m["anchor/loss"]) > 0


def test_ease_gate_gives_exactly_zero_gradient_below_tau(setup):
  graphdef, params, batch, _ = setup
  g = 2
  cfg = rl_config(ease=dict(enabled=True, weight=1.0, tau=0.5))
  rng = np.random.default_rng(0)
  grad = jax.jit(jax.grad(lambda p, bt: loss_of(p, graphdef, bt, cfg)[0]))
  below = _dev(rollout_batch(batch, g, [0.0] * 8, rng))
  leaves = jax.tree.leaves(grad(params, below))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in leaves)
  above = _dev(rollout_batch(batch, g, [1.0, 0.0] * 4, rng))
  total = sum(
      float(jnp.abs(x).sum()) for x in jax.tree.leaves(grad(params, above))
  )
  assert total > 0


def test_ease_step_moves_attention_toward_the_target(setup):
  graphdef, params, batch, _ = setup
  g = 2
  cfg = rl_config(ease=dict(enabled=True, weight=1.0, tau=0.0))
  bt = _dev(rollout_batch(batch, g, [1.0] * 8, np.random.default_rng(1)))

  def ease(p):
    _, m = loss_of(p, graphdef, bt, cfg)
    return m["ease/loss"], m

  grad_fn = jax.jit(jax.value_and_grad(ease, has_aux=True))
  (kl0, m0), grads = grad_fn(params)
  new = jax.tree.map(lambda p, gr: p - 0.5 * gr, params, grads)
  (kl1, m1), _ = grad_fn(new)
  assert float(kl1) < float(kl0)
  assert float(m1["ease/evidence_mass"]) > float(m0["ease/evidence_mass"])


def _one_update(graphdef, params, batch, cfg, rows):
  """Params and metrics after one SGD(1) update over micro-batches."""
  tx = optax.sgd(1.0)
  state = steps.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
  update = steps.make_update(rl_loss.RL, tx, graphdef, cfg)
  b = batch.prompt_ids.shape[0]
  micro = rl.layout(_dev(batch), np.arange(b), rows)
  assert micro.tokens.shape[:2] == (batch.tokens.shape[0] // rows, rows)
  state, m = update(jax.tree.map(jnp.copy, state), micro, jax.random.key(3))
  return state.params, jax.device_get(m)


@pytest.mark.parametrize(
    "overrides,micro_rows",
    [
        (dict(ease=dict(enabled=True, weight=0.5, tau=0.5, num_queries=4)),
         (8, 2)),
        (dict(aggregation="seq-mean-token-mean", kl_beta=0.04, clip_low=0.1,
              clip_high=0.1), (2,)),
    ],
    ids=["token_mean_ease", "seq_mean_kl"],
)  # fmt: skip
def test_micro_batches_accumulate_to_the_one_batch_update(
    setup, overrides, micro_rows
):
  """k micro-batches (whole groups, or rows of one group) == one batch."""
  graphdef, params, batch, _ = setup
  g, rng = 4, np.random.default_rng(2)
  bt = rollout_batch(
      batch,
      g,
      rewards=[1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0],
      rng=rng,
      lengths=rng.integers(0, 9, (16,)),  # ragged, some empty
      advantages=rng.normal(size=(16,)),
  )
  cfg = rl_config(**overrides)
  ref_params, ref_m = _one_update(graphdef, params, bt, cfg, rows=16)
  moved = max(
      float(jnp.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))
  )
  assert moved > 1e-3  # the update did something the comparison can see
  for rows in micro_rows:  # 8: 2 micro-batches of 2 groups; 2: half groups
    got, m = _one_update(graphdef, params, bt, cfg, rows=rows)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_sft_micro_batches_accumulate_to_the_one_batch_update(setup):
  graphdef, params, batch, _ = setup
  anchor = dict(common.base_config().sft.anchor, enabled=True, weight=1.0)
  cfg = steps.SFTConfig(anchor=steps.AnchorConfig(**anchor))
  tx = optax.sgd(1.0)
  update = steps.make_update(sft.SFT, tx, graphdef, cfg)
  arrays = {k: batch[k] for k in sft.KEYS}
  arrays["position_ids"] = np.swapaxes(arrays["position_ids"], 0, 1)
  arrays["response_mask"] = arrays["response_mask"].copy()
  arrays["response_mask"][1, 3:] = False  # ragged
  arrays["has_boxes"] = np.array([True, False, True, True])
  out = []
  for rows in (4, 1):
    state = steps.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    micro = sft.micro_batches(_dev(arrays), rows)
    state, m = update(jax.tree.map(jnp.copy, state), micro, jax.random.key(0))
    out.append((state.params, m))
  np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], atol=1e-6)
  for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_config_dataclasses_take_every_value_from_the_config():
  rl_block = common.base_config().rl
  cfg = steps.RLConfig.from_config(rl_block)
  assert cfg.clip_ratio_c == 3.0 and cfg.loss == "dapo"
  rl_block.ease.weight = 0.25
  assert steps.RLConfig.from_config(rl_block).ease.weight == 0.25
  rl_block.ease.wieght = 1.0  # a typo in a config file
  with pytest.raises(ValueError, match="rl.ease has unknown keys.*wieght"):
    steps.RLConfig.from_config(rl_block)
  del rl_block.ease["wieght"]
  rl_block.loss = "dappo"
  with pytest.raises(KeyError, match="no policy loss named 'dappo'"):
    steps.RLConfig.from_config(rl_block)
  assert dataclasses.fields(steps.EaseConfig)[0].default is dataclasses.MISSING


def test_update_and_rollout_lower_from_abstract_inputs(setup):
  """What benchmarks/memory.py does at 3B / 7B: no data, no allocation."""
  from faithful_rl import rollout  # pylint: disable=g-import-not-at-top

  graphdef, params, _, _ = setup
  model_config = nnx.merge(graphdef, params).config
  cfg = rl_config(ease=dict(enabled=True))
  tx = optax.adamw(1e-6)
  abstract_params = jax.eval_shape(lambda: params)
  state = jax.eval_shape(
      lambda p: steps.TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)),
      abstract_params,
  )
  shapes = dict(prompt_len=64, patches=64, response_len=16,
                model_config=model_config)  # fmt: skip
  micro = rl.RolloutBatch.abstract(prompts=1, num_samples=4, leading=(3,),
                                   **shapes)  # fmt: skip
  key = jax.eval_shape(lambda: jax.random.key(0))
  lowered = steps.make_update(rl_loss.RL, tx, graphdef, cfg).lower(
      state, micro, key
  )
  assert "while" in lowered.as_text()  # the scan over 3 micro-batches
  chunk = rl.RolloutBatch.abstract(prompts=2, num_samples=4, **shapes)
  sampling = rollout.SamplingConfig(num_samples=4, max_new_tokens=16)
  row_ids = jax.ShapeDtypeStruct((8,), jnp.int32)
  lowered = rollout.Engine().lower(
      graphdef, sampling, abstract_params, chunk.prompt_inputs(), key, row_ids
  )
  assert lowered.out_info.tokens.shape == (8, 16)


def test_analysis_and_reference_in_chunks_equal_one_chunk(setup):
  """Faithful-MR1's and VPPO's passes, and the reference log-probs, in
  chunks of half a group equal one chunk of everything (per-row keys)."""
  from faithful_rl import rollout  # pylint: disable=g-import-not-at-top
  from faithful_rl.rl import analysis  # pylint: disable=g-import-not-at-top

  graphdef, params, batch, _ = setup
  g, rng = 2, np.random.default_rng(4)
  bt = rollout_batch(batch, g, [1, 0] * 4, rng, lengths=rng.integers(1, 9, 8))
  bt.cf_vision = batch["cf_vision"]
  bt = _dev(bt)
  cfg = rl_config(
      reinforce=dict(enabled=True, num_queries=4), vppo=dict(enabled=True)
  )
  black = jnp.zeros((batch["vision"].pixel_values.shape[-1],), jnp.float32)
  run = jax.jit(analysis.analyze_chunks, static_argnums=(1, 4))
  order = np.arange(4)
  passes = [
      rl.unlayout(run(params, graphdef, rl.layout(bt, order, rows),
                      jax.random.key(5), cfg, black), 8)  # fmt: skip
      for rows in (8, 1)
  ]
  whole = jax.device_get(passes[0])
  assert 0 < whole["evidence_mass"].min() and whole["evidence_mass"].max() < 1
  assert whole["dependency"].max() > 0 and np.isfinite(whole["logp_cf"]).all()
  for k in whole:
    np.testing.assert_allclose(passes[1][k], whole[k], atol=1e-5, err_msg=k)
  ref = jax.jit(analysis.reference_chunks, static_argnums=(1, 3))
  got = rl.unlayout(ref(params, graphdef, rl.layout(bt, order, 1), cfg), 8)
  model = nnx.merge(graphdef, params)
  want, _, _ = forward.score(model, bt.prompt_inputs(), bt.tokens, bt.mask,
                             num_samples=g)  # fmt: skip
  mask = np.asarray(bt.mask)
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask],
                             atol=1e-5)  # fmt: skip
