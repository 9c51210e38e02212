"""Slot refill (`faithful_rl.refill`): the static sampler's responses.

A tiny random model (float32 on CPU). Rows stop at very different steps:
forced lengths drawn long-tailed (`sampling.next_tokens`: the stop token
taken at a drawn step, through the same stop test as a drawn one), some
rows never stopping (truncated at R) and some stopping at a stop token
they drew. Every row's tokens, mask and truncation equal the static
sampler's (`rollout.Engine` without refill) exactly, and its log-probs to
float rounding, for G = 1 (with images) and G = 3, whatever S and W (one
group of slots, a few, window 1 to longer than any response).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faithful_rl import data
from faithful_rl import models
from faithful_rl import refill
from faithful_rl import rollout
from faithful_rl import sampling
import helpers

R = 20
BUCKETS = data.Buckets(prompt=(32,), patches=(64,), response=(R,))


@pytest.fixture(scope="module")
def model():
  return models.create(helpers.tiny_config(), dtype=jnp.float32, seed=0)


def _batch(images: bool, n: int = 5) -> dict:
  rng = np.random.default_rng(0)
  grids = lambda i: [(1, 4, 4 + 2 * (i % 3))] if images else []
  examples = [
      helpers.example(rng, str(i), grids(i), 3 + 2 * i, 2 + i % 4)
      for i in range(n)
  ]
  arrays = data.collate(
      examples, model_config=helpers.tiny_config(), buckets=BUCKETS
  ).arrays
  keys = ("prompt_ids", "prompt_mask", "position_ids", "vision")
  return {k: arrays[k] for k in keys}


def _forced(n: int) -> np.ndarray:
  """Long-tailed lengths, some rows left free (0: no forced stop)."""
  rng = np.random.default_rng(1)
  lengths = np.minimum(rng.geometric(0.2, n), R + 1).astype(np.int32)
  lengths[::4] = 0
  return lengths


def _config(g: int, stop: tuple[int, ...]):
  return rollout.SamplingConfig(
      num_samples=g, max_new_tokens=R, temperature=1.3, top_k=40,
      stop_tokens=stop, pad_token=helpers.PAD,
  )  # fmt: skip


def _check(model, batch, g, settings):
  n = batch["prompt_ids"].shape[0] * g
  forced = jnp.asarray(_forced(n))
  row_ids = jnp.asarray(np.random.default_rng(2).permutation(100)[:n])
  rng = jax.random.key(3)
  # A natural stop token: one a free row draws early, without forcing.
  free = rollout.Engine().sample(
      model, batch, rng, _config(g, (helpers.PAD,)), row_ids=row_ids
  )
  stop = int(free.tokens[0, 3])
  config = _config(g, (helpers.PAD, stop))
  ref = rollout.Engine().sample(
      model, batch, rng, config, row_ids=row_ids, forced_lengths=forced
  )
  lengths = np.asarray(ref.lengths)
  assert lengths.min() <= 3 and lengths.max() == R, lengths
  assert ref.truncated.any() and not ref.truncated.all()
  for slots, window in settings:
    stats = refill.Stats()
    out = refill.sample(
        model, batch, rng, config, refill.Refill(slots, window),
        row_ids=row_ids, forced_lengths=forced, stats=stats,
    )  # fmt: skip
    for name in ("tokens", "mask", "truncated", "lengths"):
      np.testing.assert_array_equal(
          getattr(out, name), getattr(ref, name), err_msg=name
      )
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    # Every slot-step ran a real token but at most a window's tail per
    # refill and the last rows' wait: fewer steps than the static
    # sampler's S-row chunks would need.
    assert stats.steps * slots >= lengths.sum() - n
  return config, forced, row_ids


def test_refill_equals_static_with_images_one_sample(model):
  _check(model, _batch(images=True), 1, [(2, 3)])


def test_refill_equals_static_groups_whatever_slots_and_window(model):
  batch = _batch(images=False)
  config, forced, row_ids = _check(model, batch, 3, [(3, 1), (6, 32)])
  # The insert and window programs compile once per bucket and size: a
  # second call (other prompts, same bucket) compiles nothing.
  sizes = (refill._insert_program._cache_size(),
           refill._window_program._cache_size())  # fmt: skip
  other = dict(batch, prompt_ids=np.roll(batch["prompt_ids"], 1, axis=0))
  refill.sample(
      model, other, jax.random.key(4), config, refill.Refill(6, 32),
      row_ids=row_ids, forced_lengths=forced,
  )  # fmt: skip
  assert (
      refill._insert_program._cache_size(),
      refill._window_program._cache_size(),
  ) == sizes


def test_refill_checks_its_settings(model):
  batch = _batch(images=False, n=1)
  with pytest.raises(ValueError, match="multiple of G=3"):
    refill.sample(model, batch, jax.random.key(0), _config(3, (1,)),
                  refill.Refill(4, 8))  # fmt: skip
  with pytest.raises(ValueError, match="needs a stop token"):
    sampling.next_tokens(
        jax.random.key(0)[None], 0, jnp.zeros((1, 8)), _config(1, ()),
        jnp.ones((1,), jnp.int32),
    )  # fmt: skip
