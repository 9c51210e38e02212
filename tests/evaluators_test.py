"""Evaluators: one answer check for greedy and sampled accuracy; the
prior-shortcut splits and their gap."""

import re

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from faithful_rl import models
from faithful_rl import rollout
from faithful_rl import train
from faithful_rl.data import batching
from faithful_rl.data import synthetic
from faithful_rl.evaluators import accuracy
from faithful_rl.evaluators import shortcut


class ScriptedEngine:
  """Answers prompt i of a batch with `respond(i, prompt text)`, greedy or
  sampled.

  Rows are prompt-major, as `rollout.Engine.sample` lays them out.
  """

  def __init__(self, processor, respond):
    self.processor, self.respond = processor, respond

  def sample(self, model, prompt, rng, config):
    del model, rng
    ids = np.asarray(prompt["prompt_ids"])
    mask = np.asarray(prompt["prompt_mask"]).astype(bool)
    g, width = config.num_samples, config.max_new_tokens
    # Rows that pad the batch have no prompt; they answer nothing.
    texts = [self.processor.decode(p[m]) for p, m in zip(ids, mask)]
    tokens = np.zeros((len(texts) * g, width), np.int32)
    valid = np.zeros(tokens.shape, bool)
    for i in range(len(texts) * g):
      text = texts[i // g]
      response = self.respond(i // g, text) if text else ""
      row = self.processor.tokenizer(response, add_special_tokens=False)
      row = list(row["input_ids"]) + [self.processor.ids.im_end]
      tokens[i, : len(row)], valid[i, : len(row)] = row, True
    return rollout.Rollout(
        tokens=jnp.asarray(tokens),
        logprobs=jnp.zeros(tokens.shape, jnp.float32),
        mask=jnp.asarray(valid),
        truncated=jnp.zeros((len(tokens),), bool),
        lengths=jnp.asarray(valid.sum(-1), jnp.int32),
    )


@pytest.fixture(scope="module")
def setup():
  config = demo.demo_config(runlocal=True)
  model_config = train.model_config_for(config)
  processor = train.make_processor(config, model_config)
  # Shapes only: the scripted engine answers, and the attention diagnostics
  # are stubbed out (`no_attention`).
  model = nnx.eval_shape(lambda: models.create(model_config, dtype=jnp.float32))
  return config, processor, model


@pytest.fixture
def no_attention(monkeypatch):
  """The attention diagnostics need a compiled probe; these tests do not
  check them."""
  monkeypatch.setattr(
      accuracy,
      "_attention_stats_jit",
      lambda params, graphdef, batch, tokens, *a: (np.zeros(len(tokens)),) * 3,
  )


def evaluate(setup, records, engine, **kw):
  """`accuracy.evaluate` on `records` in one batch, the demo's buckets."""
  config, processor, model = setup
  buckets = batching.Buckets(
      prompt=config.data.prompt_buckets,
      patches=config.data.patch_buckets,
      response=config.data.response_buckets,
  )
  return accuracy.evaluate(
      model, records, processor, engine=engine, max_new_tokens=24,
      batch_size=8, buckets=buckets, **kw,
  )  # fmt: skip


@pytest.mark.parametrize("boxed_only", [False, True])
def test_greedy_and_sampled_accuracy_use_the_same_check(
    setup, boxed_only, no_attention
):
  processor = setup[1]
  cfg = synthetic.SyntheticConfig(families=("attribute",))
  records = list(synthetic.generate(cfg, "test", 6))

  def respond(i, prompt):  # one batch holds all six, in order
    del prompt
    # Every answer is right; the squares' are not boxed.
    answer = records[i]["answer"]
    if "square" in records[i]["question"]:
      return f"The answer is {answer}."
    return f"The shape is {answer}. \\boxed{{{answer}}}"

  boxed = np.mean(["square" not in r["question"] for r in records])
  assert 0 < boxed < 1
  out = evaluate(
      setup, records, ScriptedEngine(processor, respond),
      boxed_only=boxed_only, sampled=3,
  )  # fmt: skip
  expected = boxed if boxed_only else 1.0
  assert out["num_examples"] == 6
  assert out["accuracy"] == pytest.approx(expected)
  assert out["sampled_accuracy"] == pytest.approx(expected)
  assert out["format"] == pytest.approx(boxed)


def test_a_text_only_policy_shows_the_shortcut_gap(
    setup, no_attention, tmp_path
):
  config, processor, model = setup
  config = config.copy_and_resolve_references()
  config.data.synthetic = dict(
      families=("attribute",),
      prior=0.7,
      num_train=60,
      num_validation=0,
      num_test=10,
  )
  cfg = synthetic.config_from_dict(config.data.synthetic.to_dict())

  def respond(i, prompt):  # the usual answer, whatever the image shows
    del i
    question = re.search(r"What colour is the \w+\?", prompt).group(0)
    usual = synthetic.usual_answer(cfg, "attribute", question)
    return f"The shape is {usual}. \\boxed{{{usual}}}"

  out = shortcut.evaluate_splits(
      model,
      processor,
      config,
      str(tmp_path),
      num_examples=10,
      sampled=2,
      engine=ScriptedEngine(processor, respond),
  )
  # The prior holds on ceil(0.7 j)-pattern examples: 7 of the first 10.
  assert out["test_in_prior"]["accuracy"] == pytest.approx(0.7)
  assert out["test_in_prior"]["sampled_accuracy"] == pytest.approx(0.7)
  assert out["test_counter_prior"]["accuracy"] == 0.0
  assert out["gap"]["accuracy"] == pytest.approx(0.7)
  # The question-only baseline answers the same way, so scores the same.
  for split in shortcut.SPLITS:
    assert out[split]["question_only"] == pytest.approx(out[split]["accuracy"])
    assert out[split]["chance"] == pytest.approx(0.2)
  assert "gap (in - counter)" in shortcut.table(out)


def test_evidence_flip_rate_counts_correct_answers_the_mask_breaks(
    setup, no_attention
):
  processor = setup[1]
  cfg = synthetic.SyntheticConfig(families=("attribute",))
  records = list(synthetic.generate(cfg, "test", 8))
  calls = []

  class TwoPassEngine(ScriptedEngine):
    """The first call of the batch sees the images, the second the
    counterfactual ones (the evaluator's order with `flips` alone)."""

    def sample(self, model, prompt, rng, config):
      calls.append(np.asarray(prompt["vision"].pixel_values).sum())
      return super().sample(model, prompt, rng, config)

  def respond(i, prompt):
    del prompt
    q, answer = records[i]["question"], records[i]["answer"]
    masked = len(calls) % 2 == 0
    other = next(c for c in synthetic.COLOURS if c != answer)
    # Squares are wrong either way; on the masked image circles go wrong.
    wrong = "square" in q or (masked and "circle" in q)
    return f"\\boxed{{{other if wrong else answer}}}"

  questions = [r["question"] for r in records]
  right = [q for q in questions if "square" not in q]
  circles = [q for q in right if "circle" in q]
  assert 0 < len(circles) < len(right)
  out = evaluate(
      setup, records, TwoPassEngine(processor, respond), boxed_only=True,
      flips=True,
  )  # fmt: skip
  assert len(calls) == 2 and calls[0] != calls[1]
  assert out["accuracy"] == pytest.approx(len(right) / len(records))
  assert out["evidence_flip"] == pytest.approx(len(circles) / len(right))
