"""The RL step's host side, with a fake sampler and hand-worked values.

No model runs here: a fake engine answers each row id from a table, so the
dynamic-sampling decisions, the rewards, the batch `assemble` builds and
the advantages can be written down by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from faithful_rl import rl
from faithful_rl import rollout
from faithful_rl import sharding
from faithful_rl import steps
from faithful_rl.data import batching
from faithful_rl.rl import analysis
from faithful_rl.rl import rounds
import helpers

G = 2
R = 8  # max_new_tokens
CONFIG = helpers.tiny_config()
BUCKETS = batching.Buckets(prompt=(32, 48), patches=(64, 128), response=(4, 8))


def example(name, grid=(1, 4, 8), n_text=5, seed=0):
  """An example with boxes (tokens 0-1 are evidence) whose answer is 1."""
  v = grid[0] * grid[1] * grid[2] // 4
  return helpers.example(
      np.random.default_rng(seed), name, [grid], n_text, 0,
      evidence_mask=np.arange(v) < 2, has_boxes=True, answer="1",
      answer_type="number",
  )  # fmt: skip


class FakeIterator:

  def __init__(self, examples):
    self.examples = list(examples)

  def next_examples(self, k):
    out, self.examples = self.examples[:k], self.examples[k:]
    return out


class FakeProcessor:
  """Token 1 first answers '1' (right), anything else '2' (wrong)."""

  def decode_responses(self, tokens, mask):
    return [
        "\\boxed{1}" if m[0] and t[0] == 1 else "\\boxed{2}"
        for t, m in zip(np.asarray(tokens), np.asarray(mask))
    ]


class FakeEngine:
  """Answers row id s * G + j of round r with OUTCOMES[r][s][j].

  An outcome is (correct, length); length R means truncated. Log-probs are
  -(row id + 1) / 100 per token, so the batch's rows can be traced.
  """

  def __init__(self, outcomes):
    self.outcomes, self.rounds, self.calls = outcomes, {}, []

  def sample(self, model, batch, rng, config, row_ids=None):
    del model
    key = tuple(np.asarray(jax.random.key_data(rng)).tolist())
    r = self.rounds.setdefault(key, len(self.rounds))
    ids = np.asarray(row_ids)
    self.calls.append((r, ids.tolist(), batch["prompt_ids"].shape[0]))
    assert len(ids) == batch["prompt_ids"].shape[0] * config.num_samples
    n = len(ids)
    tokens = np.full((n, R), 0, np.int32)
    mask = np.zeros((n, R), bool)
    for i, row in enumerate(ids):
      correct, length = self.outcomes[r][row // G][row % G]
      tokens[i, :length] = 3
      tokens[i, 0] = 1 if correct else 2
      mask[i, :length] = True
    logp = np.where(mask, -(ids[:, None] + 1) / 100, 0.0).astype(np.float32)
    lengths = mask.sum(-1).astype(np.int32)
    return rollout.Rollout(
        tokens=jnp.asarray(tokens),
        logprobs=jnp.asarray(logp),
        mask=jnp.asarray(mask),
        truncated=jnp.asarray(lengths == R),
        lengths=jnp.asarray(lengths),
    )


def spec(chunk=4, overlong="shaping"):
  return rounds.Spec(
      sampling=rollout.SamplingConfig(num_samples=G, max_new_tokens=R),
      chunk=chunk,
      boxed_only=True,
      overlong=overlong,
      overlong_cache=4,  # soft limit 4: length 6 costs (4 - 6) / 4 = -0.5
  )


def run(outcomes, *, num_prompts, gen_prompts, max_rounds, chunk=4,
        overlong="shaping", dynamic=True):  # fmt: skip
  mesh = sharding.make_mesh()
  examples = [example(f"e{i}", seed=i) for i in range(12)]
  engine = FakeEngine(outcomes)
  sp = spec(chunk, overlong)
  got = rounds.collect(
      None, engine, FakeIterator(examples), FakeProcessor(),
      model_config=CONFIG, buckets=BUCKETS, spec=sp, num_prompts=num_prompts,
      gen_prompts=gen_prompts, dynamic=dynamic, max_rounds=max_rounds,
      rng=jax.random.key(0), mesh=mesh,
  )  # fmt: skip
  return engine, got, sp, mesh


RIGHT, WRONG, LONG_RIGHT = (True, 2), (False, 2), (True, 6)
OUTCOMES = [
    # Round 0: group 0 all right (zero variance), 1 mixed, 2 all wrong,
    # 3 mixed.
    [[RIGHT, RIGHT], [RIGHT, WRONG], [WRONG, WRONG], [WRONG, LONG_RIGHT]],
    # Round 1: zero, mixed, zero, mixed.
    [[WRONG, WRONG], [LONG_RIGHT, RIGHT], [RIGHT, RIGHT], [RIGHT, WRONG]],
]


def test_dynamic_sampling_keeps_informative_groups_first_come():
  engine, (rds, kept, stats), sp, mesh = run(
      OUTCOMES, num_prompts=3, gen_prompts=4, max_rounds=3
  )
  # Round 0 gives groups 1 and 3; round 1's first informative group is 1.
  assert kept == [(0, 1), (0, 3), (1, 1)]
  assert stats["rounds"] == 2 and stats["sampled_groups"] == 8
  assert stats["zero_variance_groups"] == 4 and stats["filled_groups"] == 0
  assert stats["zero_variance_frac"] == 0.5
  assert stats["sampled_accuracy"] == 9 / 16
  # Rewards: correctness + overlong shaping (length 6: -0.5).
  np.testing.assert_allclose(
      rds[0].scores["reward"], [1, 1, 1, 0, 0, 0, 0, 0.5]
  )
  # Rollout calls of 4 rows = 2 prompts, row ids s * G + j.
  assert engine.calls[0] == (0, [0, 1, 2, 3], 2)
  assert engine.calls[1] == (0, [4, 5, 6, 7], 2)
  batch, bstats = rounds.assemble(
      rds, kept, model_config=CONFIG, buckets=BUCKETS, spec=sp, mesh=mesh
  )
  b = jax.device_get(batch)
  # Kept rows in order: round 0 rows 2, 3, 6, 7 and round 1 rows 2, 3.
  np.testing.assert_allclose(
      b.old_logp[:, 0], [-0.03, -0.04, -0.07, -0.08, -0.03, -0.04]
  )
  np.testing.assert_allclose(b.rewards, [1, 0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(b.correct, [1, 0, 0, 1, 1, 1])
  assert b.tokens.shape == (6, 8)  # longest kept response 6: bucket 8
  np.testing.assert_array_equal(b.mask.sum(-1), [2, 2, 2, 6, 6, 2])
  np.testing.assert_array_equal(b.row_ids, np.arange(6))
  np.testing.assert_array_equal(b.group_ids, np.arange(3))
  np.testing.assert_array_equal(b.advantages, 0.0)
  assert b.prompt_ids.shape == (3, 32) and b.position_ids.shape == (3, 3, 32)
  assert bstats["batch_accuracy"] == pytest.approx(4 / 6)
  assert bstats["overlong"] == pytest.approx(-1.0 / 6)


def test_short_of_groups_fills_with_zero_variance_ones():
  _, (rds, kept, stats), sp, mesh = run(
      OUTCOMES, num_prompts=3, gen_prompts=4, max_rounds=1, overlong="filter"
  )
  assert kept == [(0, 1), (0, 3), (0, 0)] and stats["filled_groups"] == 1
  batch, _ = rounds.assemble(
      rds, kept, model_config=CONFIG, buckets=BUCKETS, spec=sp, mesh=mesh
  )
  # No response is truncated (length < R): filtering keeps every mask;
  # without shaping the long right answer earns 1.
  b = jax.device_get(batch)
  np.testing.assert_allclose(b.rewards, [1, 0, 0, 1, 1, 1])
  truncated = [[(True, R), WRONG], [RIGHT, WRONG]] + OUTCOMES[0][2:]
  _, (rds, kept, _), sp, mesh = run(
      [truncated], num_prompts=2, gen_prompts=4, max_rounds=1,
      overlong="filter",
  )  # fmt: skip
  batch, _ = rounds.assemble(
      rds, kept, model_config=CONFIG, buckets=BUCKETS, spec=sp, mesh=mesh
  )
  # Kept: groups 0 and 1; the truncated row 0 leaves the loss.
  np.testing.assert_array_equal(
      jax.device_get(batch.mask).sum(-1), [0, 2, 2, 2]
  )


def test_without_dynamic_sampling_one_round_is_the_batch():
  _, (_, kept, stats), _, _ = run(
      OUTCOMES, num_prompts=4, gen_prompts=8, max_rounds=3, dynamic=False
  )
  assert kept == [(0, 0), (0, 1), (0, 2), (0, 3)] and stats["rounds"] == 1


def test_chunks_smaller_than_a_group_sample_the_same_rows():
  e4, (r4, _, _), _, _ = run(OUTCOMES, num_prompts=3, gen_prompts=4,
                             max_rounds=3, chunk=4)  # fmt: skip
  e1, (r1, _, _), _, _ = run(OUTCOMES, num_prompts=3, gen_prompts=4,
                             max_rounds=3, chunk=1)  # fmt: skip
  assert e1.calls[:3] == [(0, [0], 1), (0, [1], 1), (0, [2], 1)]
  assert len(e1.calls) == 4 * len(e4.calls)
  for a, b in zip(r4, r1):
    for k in a.rows:
      np.testing.assert_array_equal(a.rows[k], b.rows[k])


def test_canonical_order_and_chunk_shapes():
  # 2 processes x 3 prompts, process-major -> prompt i * 2 + p.
  x = np.asarray([0, 2, 4, 1, 3, 5])
  np.testing.assert_array_equal(rounds.canonical(x, 2), np.arange(6))
  assert rounds.chunk_shape(16, 4, 2) == (2, 4)  # 8 rows each: 2 prompts
  assert rounds.chunk_shape(4, 4, 2) == (1, 2)  # half a group each
  with pytest.raises(ValueError, match="rollout_chunk=6"):
    rounds.chunk_shape(6, 4, 1)
  with pytest.raises(ValueError, match="rollout_chunk=3"):
    rounds.chunk_shape(3, 4, 2)


def test_plan_lays_out_whole_and_partial_groups():
  p, r = rl.plan([2, 0, 1, 3], num_samples=2, rows=4)
  np.testing.assert_array_equal(p, [[2, 0], [1, 3]])
  np.testing.assert_array_equal(r, [[4, 5, 0, 1], [2, 3, 6, 7]])
  p, r = rl.plan([1, 0], num_samples=4, rows=2)
  np.testing.assert_array_equal(p, [[1], [1], [0], [0]])
  np.testing.assert_array_equal(r, [[4, 5], [6, 7], [0, 1], [2, 3]])
  with pytest.raises(ValueError, match="multiple of the group size"):
    rl.plan([0, 1], num_samples=4, rows=6)


def test_check_sizes_names_the_key():
  c = common.base_config().rl
  c.num_prompts, c.num_samples, c.num_minibatches = 8, 4, 2
  c.rollout_chunk, c.analysis_chunk, c.micro_batch = 8, 8, 8
  rl.check_sizes(c)
  c.micro_batch = 12
  with pytest.raises(ValueError, match="rl.micro_batch=12"):
    rl.check_sizes(c)
  c.micro_batch, c.analysis_chunk = 8, 64
  with pytest.raises(ValueError, match="rl.analysis_chunk=64"):
    rl.check_sizes(c)
  c.analysis_chunk, c.old_logp = 8, "trainer"
  with pytest.raises(ValueError, match="rl.old_logp must be one of"):
    rl.check_sizes(c)


def test_logp_gap_by_hand():
  """|sampler - recomputed| over real tokens only: the padded token's gap
  of 5 is not counted."""
  sampler = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0]])
  recomputed = jnp.array([[-1.5, -2.0, 2.0], [-0.25, -4.0, -1.0]])
  mask = jnp.array([[True, True, False], [True, True, True]])
  gap = analysis.logp_gap(sampler, recomputed, mask)
  np.testing.assert_allclose(gap["old_logp_gap_mean"], 0.75 / 5)
  np.testing.assert_allclose(gap["old_logp_gap_max"], 0.5)


def test_pad_prompts_equals_collating_at_the_larger_buckets():
  small = [example("a", (1, 4, 8), 3), example("b", (1, 4, 4), 9, seed=1)]
  collate = lambda exs, tp, p: batching.collate(
      exs, model_config=CONFIG, truncate_response=True,
      buckets=batching.Buckets(prompt=(tp,), patches=(p,), response=(8,)),
  ).arrays  # fmt: skip
  keys = ("prompt_ids", "prompt_mask", "position_ids", "vision", "cf_vision",
          "ease_target", "evidence_mask")  # fmt: skip
  a = {k: collate(small, 32, 64)[k] for k in keys}
  a["position_ids"] = np.swapaxes(a["position_ids"], 0, 1)
  got = rl.pad_prompts(a, [e.grids for e in small], prompt_len=48,
                       patches=128, model_config=CONFIG)  # fmt: skip
  want = {k: collate(small, 48, 128)[k] for k in keys}
  want["position_ids"] = np.swapaxes(want["position_ids"], 0, 1)
  for k in keys:
    jax.tree.map(
        lambda x, y, k=k: np.testing.assert_array_equal(x, y, err_msg=k),
        got[k],
        want[k],
    )


def _finalize_batch(rewards, correct, mask_len, correct_cf=None):
  n = len(rewards)
  b = n // G
  return rl.RolloutBatch(
      prompt_ids=np.zeros((b, 4), np.int32),
      prompt_mask=np.ones((b, 4), bool),
      position_ids=np.zeros((b, 3, 4), np.int32),
      vision=None,
      cf_vision=None,
      ease_target=np.full((b, 3), 1 / 3, np.float32),
      evidence_mask=np.tile([[True, False, False]], (b, 1)),
      has_boxes=np.ones((b,), bool),
      group_ids=np.arange(b, dtype=np.int32),
      tokens=np.zeros((n, 4), np.int32),
      mask=np.arange(4)[None] < np.asarray(mask_len)[:, None],
      old_logp=np.zeros((n, 4), np.float32),
      ref_logp=None,
      token_weights=np.ones((n, 4), np.float32),
      advantages=np.zeros((n,), np.float32),
      rewards=np.asarray(rewards, np.float32),
      correct=np.asarray(correct, np.float32),
      correct_cf=None if correct_cf is None else np.asarray(correct_cf, "f4"),
      truncated=np.zeros((n,), bool),
      row_ids=np.arange(n, dtype=np.int32),
  )


def _cfg(**overrides):
  return steps.RLConfig.from_config(common.base_config().rl, **overrides)


def test_finalize_faithful_mr1_reward_and_advantages_by_hand():
  batch = _finalize_batch([1, 0, 1, 1], [1, 0, 1, 1], [4, 4, 4, 4],
                          correct_cf=[0, 0, 1, 0])  # fmt: skip
  cfg = _cfg(reinforce=dict(enabled=True, test="rollout_flip",
                            lambda_attn=0.5))  # fmt: skip
  # Trajectory attention [.6, .2, .2]: evidence (column 0) mass 0.6.
  att = np.tile([[0.6, 0.2, 0.2]], (4, 1)).astype(np.float32)
  passes = dict(
      attention=att,
      key_valid=np.ones((4, 3), bool),
      evidence_mass=np.full((4,), 0.6, np.float32),
  )
  out, stats = analysis.finalize(batch, passes, cfg)
  # Causal (right, and wrong on the counterfactual): rows 0 and 3.
  np.testing.assert_allclose(out.rewards, [1.3, 0, 1, 1.3], atol=1e-6)
  # Groups (1.3, 0), (1, 1.3): sample std |a - b| / sqrt 2, A = +-1/sqrt 2.
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(out.advantages, [s, -s, -s, s], atol=1e-5)
  assert float(stats["mr1/causal_rate"]) == 0.5
  assert float(stats["mr1/causal_rate_correct"]) == pytest.approx(2 / 3)


def test_finalize_vppo_leaves_empty_responses_out_of_the_scale():
  # Row 3 was emptied by overlong filtering: its score must not enter
  # the min-max normalisation (it would be the minimum, 0).
  batch = _finalize_batch([1, 0, 1, 0], [1, 0, 1, 0], [2, 2, 2, 0])
  dep = np.asarray(
      [[1, 3, 0, 0], [2, 2, 0, 0], [5, 1, 0, 0], [0, 0, 0, 0]], np.float32
  )
  cfg = _cfg(vppo=dict(enabled=True, topk=0.5, beta_min=0.9))
  out, stats = analysis.finalize(batch, dict(dependency=dep), cfg)
  # Means over valid tokens 2, 2, 3 (row 3 left out): s = 0, 0, 1, mean 1/3,
  # beta_max = 0.9 + 0.1 * 3 = 1.2; multipliers 0.9, 0.9, 1.2, 1.
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(
      out.advantages, [0.9 * s, -0.9 * s, 1.2 * s, -1.0 * s], atol=1e-5
  )
  # Top half of each response's tokens by S (ties: the earlier one).
  np.testing.assert_array_equal(
      out.token_weights,
      [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
  )
  assert float(stats["vppo/multiplier_max"]) == pytest.approx(1.2)
