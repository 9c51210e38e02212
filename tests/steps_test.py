"""The jitted loss functions, on real processed batches and a tiny model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from faithful_rl import models
from faithful_rl import rl
from faithful_rl import steps
from faithful_rl import train
from faithful_rl.data import batching
from faithful_rl.data import synthetic


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


def _dev(batch):
  return jax.tree.map(jnp.asarray, batch)


def test_anchor_loss_reads_exactly_the_focus_row(setup):
  graphdef, params, batch, processor = setup
  cfg = steps.SFTConfig(anchor=steps.AnchorConfig(enabled=True, weight=1.0))
  assert (batch["response_ids"][:, 0] == processor.ids.focus).all()
  _, m = steps.sft_loss(params, graphdef, _dev(batch), None, cfg)
  # Later response tokens cannot change the <Focus> row (causal), but they
  # change the cross-entropy.
  other = dict(batch)
  other["response_ids"] = batch["response_ids"].copy()
  other["response_ids"][:, 2:] = (other["response_ids"][:, 2:] + 7) % 300 + 10
  _, m2 = steps.sft_loss(params, graphdef, _dev(other), None, cfg)
  assert float(m2["anchor/loss"]) == float(m["anchor/loss"])
  assert float(m2["ce"]) != float(m["ce"])
  # A different focus target does change it.
  moved = dict(batch)
  moved["focus_target"] = np.roll(batch["focus_target"], 3, axis=1)
  _, m3 = steps.sft_loss(params, graphdef, _dev(moved), None, cfg)
  assert float(m3["anchor/loss"]) != float(m["anchor/loss"])
  assert np.isfinite(float(m["anchor/loss"])) and float(m["anchor/loss"]) > 0


def _rl_batch(batch, g, rewards, rng):
  b = batch["prompt_ids"].shape[0]
  n = b * g
  r = 8
  out = {k: batch[k] for k in rl.PROMPT_LEVEL}
  out.update(
      tokens=rng.integers(10, 300, (n, r)).astype(np.int32),
      mask=np.ones((n, r), bool),
      old_logp=np.full((n, r), -2.0, np.float32),
      advantages=np.zeros((n,), np.float32),  # no policy gradient
      rewards=np.asarray(rewards, np.float32),
      token_weights=np.ones((n, r), np.float32),
  )
  return out


def test_ease_gate_gives_exactly_zero_gradient_below_tau(setup):
  graphdef, params, batch, _ = setup
  g = 2
  cfg = steps.RLConfig(
      num_samples=g, ease=steps.EaseConfig(enabled=True, weight=1.0, tau=0.5)
  )
  rng = np.random.default_rng(0)
  grad = jax.jit(
      jax.grad(
          lambda p, bt: steps.rl_loss(p, graphdef, bt, jax.random.key(0), cfg)[
              0
          ]
      ),
  )
  below = _dev(_rl_batch(batch, g, [0.0] * 8, rng))
  leaves = jax.tree.leaves(grad(params, below))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in leaves)
  above = _dev(_rl_batch(batch, g, [1.0, 0.0] * 4, rng))
  total = sum(
      float(jnp.abs(x).sum()) for x in jax.tree.leaves(grad(params, above))
  )
  assert total > 0


def test_ease_step_moves_attention_toward_the_target(setup):
  graphdef, params, batch, _ = setup
  g = 2
  cfg = steps.RLConfig(
      num_samples=g, ease=steps.EaseConfig(enabled=True, weight=1.0, tau=0.0)
  )
  bt = _dev(_rl_batch(batch, g, [1.0] * 8, np.random.default_rng(1)))

  def ease(p):
    _, m = steps.rl_loss(p, graphdef, bt, jax.random.key(0), cfg)
    return m["ease/loss"], m

  (kl0, m0), grads = jax.value_and_grad(ease, has_aux=True)(params)
  new = jax.tree.map(lambda p, gr: p - 0.5 * gr, params, grads)
  kl1, m1 = ease(new)
  assert float(kl1) < float(kl0)
  assert float(m1["ease/evidence_mass"]) > float(m0["ease/evidence_mass"])
