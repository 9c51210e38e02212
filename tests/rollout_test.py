"""Rollout: transformers parity, log-prob agreement, sampling statistics.

Tiny random models (`helpers.tiny_config`, float32 on CPU unless stated):
greedy tokens equal `transformers`' `generate`; sampled log-probs equal the
teacher-forced training forward (`forward.score`) to 1e-4; token
frequencies pass a chi-square test against the model's distribution while
a mis-specified distribution fails it; one compiled program per bucket;
stop tokens end responses and the decode loop.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
import torch
from flax import nnx

from faithful_rl import data
from faithful_rl import forward
from faithful_rl import models
from faithful_rl import rollout
from faithful_rl import sampling
from faithful_rl.models import inputs as inputs_lib
from faithful_rl.models import qwen2_5_vl
import helpers
from helpers import IMAGE
from helpers import PAD

TOL = 1e-4  # log-probs, float32; never relaxed.
# HF's init (normal(0.02)) makes a near-bigram model whose greedy output
# falls into a 2-cycle at once and whose next-token distribution is almost
# uniform. Scaled up, responses depend on the whole context, images weigh
# as much as text, and logits have a std of ~2 (a wrong temperature shows).
INIT_SCALES = (
    ("language_model.embed_tokens", 25.0),
    ("language_model.", 4.0),  # the decoder's other matrices
    ("visual.merger.mlp.2", 20.0),
    ("lm_head", 12.0),
)
BUCKETS = data.Buckets(prompt=(32, 48), patches=(64, 128), response=(8,))


def _hf_model(config, seed=0):
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(config.to_hf())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
      elif p.ndim == 2:
        p.mul_(next((s for k, s in INIT_SCALES if k in name), 1.0))
  # No default stop token: every `generate` below names its own.
  model.generation_config.eos_token_id = None
  return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(config, HF torch model, its saved folder, our float32 model)."""
  # One torch thread: tiny ops gain nothing from more, and spinning threads
  # on a busy machine make `generate` 10x slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  config = helpers.tiny_config()
  hf = _hf_model(config)
  path = str(tmp_path_factory.mktemp("tiny"))
  hf.save_pretrained(path)
  yield config, hf, path, models.from_pretrained(path)
  torch.set_num_threads(threads)


def _collate(config, examples, buckets=BUCKETS) -> dict:
  arrays = data.collate(examples, model_config=config, buckets=buckets).arrays
  keys = ("prompt_ids", "prompt_mask", "position_ids", "vision", "cf_vision")
  return {k: arrays[k] for k in keys}


@pytest.fixture(scope="module")
def image_batch(pair):
  """Three prompts of different lengths and image sizes, left-padded to 48."""
  config = pair[0]
  rng = np.random.default_rng(0)
  examples = [
      helpers.example(rng, "a", [(1, 8, 12)], 3, 5),  # 34 tokens, 96 patches
      helpers.example(rng, "b", [(1, 6, 6)], 9, 3),  # 23 tokens, 36 patches
      helpers.example(rng, "c", [(1, 4, 8)], 2, 11),  # 23 tokens, 32 patches
  ]
  batch = _collate(config, examples)
  assert batch["prompt_ids"].shape == (3, 48)
  return examples, batch


def _prompt(batch) -> dict:
  return {k: v for k, v in batch.items() if k != "cf_vision"}


def _hf_generate(hf, batch, examples, max_new, stop=()):
  """`generate` greedy continuations, padded to max_new with PAD."""
  ids = np.asarray(batch["prompt_ids"], np.int64)
  kwargs = dict(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(np.asarray(batch["prompt_mask"], np.int64)),
  )
  grids = [g for ex in examples for g in ex.grids]
  if grids:
    kwargs.update(
        pixel_values=torch.tensor(
            np.concatenate([ex.pixel_values for ex in examples])
        ),
        image_grid_thw=torch.tensor(np.asarray(grids)),
        mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
    )
  with torch.no_grad():
    out = hf.generate(
        **kwargs,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=list(stop) or None,
        pad_token_id=PAD,
    )
  out = out[:, ids.shape[1] :].numpy()
  return np.pad(out, ((0, 0), (0, max_new - out.shape[1])))


def _pick_stop(tokens, stop_row, free_rows, lo=3, hi=20):
  """A token row `stop_row` first emits at a step in [lo, hi) and rows
  `free_rows` never emit: (token, step)."""
  for step in range(lo, hi):
    t = tokens[stop_row, step]
    if t not in tokens[stop_row, :step] and all(
        t not in tokens[r] for r in free_rows
    ):
      return int(t), step
  raise AssertionError(f"no usable stop token in\n{tokens}")


@functools.partial(nnx.jit, static_argnames=("num_samples", "temperature"))
def _score(model, batch, tokens, mask, other, *, num_samples, temperature):
  """`forward.score` log-probs; `other`: None (the batch's images) or
  another VisionInputs."""
  logp, _, _ = forward.score(
      model,
      batch,
      tokens,
      mask,
      num_samples=num_samples,
      temperature=temperature,
      vision="same" if other is None else other,
  )
  return logp


@nnx.jit
def _logits(model, ids, mask, pos, vision):
  return model(ids, attention_mask=mask, position_ids=pos, vision=vision).logits


# ---------------------------------------------------------------------------
# 1. Greedy decoding equals transformers' generate.
# ---------------------------------------------------------------------------


def _check_greedy(pair, batch, examples):
  _, hf, _, model = pair
  r = 32
  free = _hf_generate(hf, batch, examples, r)
  stop, step = _pick_stop(free, stop_row=0, free_rows=[1])
  ref = _hf_generate(hf, batch, examples, r, stop=(stop,))
  config = rollout.SamplingConfig(
      max_new_tokens=r, greedy=True, stop_tokens=(stop,), pad_token=PAD
  )
  out = rollout.Engine().sample(
      model, _prompt(batch), jax.random.key(0), config
  )
  np.testing.assert_array_equal(out.tokens, ref)
  # Row 0 ends at its stop token, row 1 runs to R: both paths are covered.
  assert int(out.lengths[0]) == step + 1 and not out.truncated[0]
  assert (
      out.tokens[0, step] == stop and (out.tokens[0, step + 1 :] == PAD).all()
  )
  assert int(out.lengths[1]) == r and out.truncated[1]
  np.testing.assert_array_equal(
      out.mask, np.arange(r)[None] < np.asarray(out.lengths)[:, None]
  )


def test_greedy_equals_transformers_generate_with_images(pair, image_batch):
  examples, batch = image_batch
  _check_greedy(pair, batch, examples)


def test_greedy_equals_transformers_generate_text_only(pair):
  rng = np.random.default_rng(1)
  prompts = [helpers.random_text(rng, n) for n in (5, 12, 8)]
  ids, mask = helpers.make_batch(rng, prompts)
  batch = dict(
      prompt_ids=ids.astype(np.int32),
      prompt_mask=mask.astype(bool),
      position_ids=inputs_lib.text_positions(mask),
  )
  _check_greedy(pair, batch, examples=[])


# ---------------------------------------------------------------------------
# 2. Sampler log-probs equal the training forward's.
# ---------------------------------------------------------------------------

# Several stop tokens: some of the 12 responses below end early, some not.
SAMPLED = rollout.SamplingConfig(
    num_samples=4,
    max_new_tokens=16,
    temperature=0.8,
    top_p=0.9,
    stop_tokens=(5, 102),
    pad_token=PAD,
)


def test_sampled_logprobs_equal_teacher_forced_score(pair, image_batch):
  _, _, _, model = pair
  batch = _prompt(image_batch[1])
  out = rollout.Engine().sample(model, batch, jax.random.key(1), SAMPLED)
  mask = np.asarray(out.mask)
  assert out.tokens.shape == (12, 16)
  assert out.truncated.any() and not out.truncated.all()
  lp = _score(
      model, batch, out.tokens, out.mask, None, num_samples=4, temperature=0.8
  )
  diff = np.abs(np.asarray(lp) - np.asarray(out.logprobs))[mask]
  assert diff.max() <= TOL, diff.max()
  assert (np.asarray(out.logprobs)[~mask] == 0).all()
  assert (np.asarray(out.logprobs)[mask] < 0).all()
  # The temperature is part of the quantity: at T=1 the scores differ.
  lp1 = _score(
      model, batch, out.tokens, out.mask, None, num_samples=4, temperature=1.0
  )
  assert np.abs(np.asarray(lp1) - np.asarray(out.logprobs))[mask].max() > 0.05


def test_chunked_rollout_equals_unchunked_token_for_token(pair, image_batch):
  """Per-row keys: calls of whole groups, or of rows of one group, sample
  what one call of everything samples (same keys)."""
  from faithful_rl import sharding  # pylint: disable=g-import-not-at-top
  from faithful_rl.rl import rounds  # pylint: disable=g-import-not-at-top

  _, _, _, model = pair
  batch = dict(image_batch[1])
  batch["position_ids"] = np.swapaxes(batch["position_ids"], 0, 1)
  mesh = sharding.make_mesh()
  engine = rollout.Engine(prompt_buckets=(48,), patch_buckets=(128,))
  sample = lambda chunk, key=1: rounds.sample_rows(
      engine, model, batch, np.arange(3), rng=jax.random.key(key),
      sampling=SAMPLED, chunk=chunk, mesh=mesh,
  )  # fmt: skip
  whole = sample(12)  # 3 prompts x G = 4 in one call
  assert whole["truncated"].any() and not whole["truncated"].all()
  assert len({tuple(t) for t in whole["tokens"]}) == 12  # all rows differ
  for chunk in (4, 2):  # one group per call; half a group per call
    got = sample(chunk)
    np.testing.assert_array_equal(got["tokens"], whole["tokens"])
    np.testing.assert_array_equal(got["mask"], whole["mask"])
    np.testing.assert_allclose(got["logprobs"], whole["logprobs"], atol=1e-5)
  other = sample(12, key=2)
  assert (other["tokens"] != whole["tokens"]).any()  # the key matters


def test_bf16_logprob_gap(pair, image_batch, capsys):
  _, _, path, model32 = pair
  model16 = models.from_pretrained(path, dtype=jnp.bfloat16)
  batch = _prompt(image_batch[1])
  out = rollout.Engine().sample(model16, batch, jax.random.key(1), SAMPLED)
  mask = np.asarray(out.mask)
  kw = dict(num_samples=4, temperature=0.8)
  lp16 = _score(model16, batch, out.tokens, out.mask, None, **kw)
  lp32 = _score(model32, batch, out.tokens, out.mask, None, **kw)
  sampled = np.asarray(out.logprobs)
  gap16 = np.abs(sampled - np.asarray(lp16, np.float32))[mask]
  gap32 = np.abs(sampled - np.asarray(lp32))[mask]
  with capsys.disabled():
    print(
        f"\nbf16 sampler log-probs ({mask.sum()} tokens): vs bf16 score"
        f" max {gap16.max():.2e} mean {gap16.mean():.2e}; vs float32 score"
        f" max {gap32.max():.2e} mean {gap32.mean():.2e}"
    )
  assert np.isfinite(sampled).all() and np.isfinite(np.asarray(lp16)).all()
  # bf16 keeps 8 significant bits, so logits of size ~4 are off by ~0.02
  # each, more after 3 layers. Bound: an importance ratio exp(gap) within
  # [0.78, 1.28] per token at worst and ~1.05 on average.
  assert gap16.max() < 0.25 and gap16.mean() < 0.05
  assert gap32.max() < 0.25 and gap32.mean() < 0.05


def _while_bodies(jaxpr):
  """The bodies of every while loop in `jaxpr`, nested ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      yield eqn.params["body_jaxpr"].jaxpr
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _while_bodies(sub)


def _casts(jaxpr):
  """(shape, from dtype, to dtype) of every cast in `jaxpr`, nested too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "convert_element_type":
      aval = eqn.invars[0].aval
      yield tuple(aval.shape), aval.dtype, eqn.params["new_dtype"]
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _casts(sub)


def test_decoding_loop_reads_compute_dtype_weights(pair, image_batch):
  """bf16 compute, float32 masters: the weights are cast once, before the
  decoding loop, not at every step: no cast inside the loop takes a
  parameter's shape (a whole stack or one layer's slice)."""
  config, _, path, _ = pair
  model = models.from_pretrained(
      path, dtype=jnp.bfloat16, param_dtype=jnp.float32
  )
  graphdef, state = nnx.split(model)
  shapes = set()
  for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
    shapes |= {tuple(x.shape), tuple(x.shape[1:])}
  batch = _prompt(image_batch[1])

  def program(state):
    return rollout.sample_traced(
        nnx.merge(graphdef, state), batch, jax.random.key(0), SAMPLED
    )

  jaxpr = jax.make_jaxpr(program)(state).jaxpr
  outside = [c for c in _casts(jaxpr) if c[0] in shapes]
  assert any(c[1] == jnp.float32 and c[2] == jnp.bfloat16 for c in outside)
  decode = max(_while_bodies(jaxpr), key=lambda j: len(j.eqns))
  inside = [
      c for c in _casts(decode)
      if c[0] in shapes and c[1] == jnp.float32 and c[2] == jnp.bfloat16
  ]  # fmt: skip
  assert not inside, inside[:5]


def _stacked_reads(jaxpr, stacked):
  """(primitive, operand shape) of every slice, gather or scan in `jaxpr`
  (nested too) that reads an array of a shape in `stacked`."""
  reads = {"slice", "dynamic_slice", "gather", "scan", "squeeze"}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in reads:
      for v in eqn.invars:
        shape = tuple(getattr(v.aval, "shape", ()))
        if shape in stacked:
          yield eqn.primitive.name, shape
    for sub in jax.core.jaxprs_in_params(eqn.params):
      yield from _stacked_reads(sub, stacked)


@pytest.mark.parametrize("num_samples", [1, 4])
def test_decoding_loop_reads_no_layer_out_of_a_stack(
    pair, image_batch, num_samples
):
  """Each decoding step reads every layer's weights and cache where they
  lie: nothing inside the loop slices (copies) a layer out of the stacked
  weights or a stacked cache, as a scan over the stack would at every
  step. G = 1 decodes into the prompt's cache, G = 4 beside a shared
  prefix."""
  config, _, _, model = pair
  tcfg = config.text
  graphdef, state = nnx.split(model)
  stacked = {
      tuple(x.shape)
      for x in jax.tree.leaves(nnx.state(model.language_model.layers))
  }
  batch = _prompt(image_batch[1])
  sampling = dataclasses.replace(SAMPLED, num_samples=num_samples)

  def program(state):
    return rollout.sample_traced(
        nnx.merge(graphdef, state), batch, jax.random.key(0), sampling
    )

  jaxpr = jax.make_jaxpr(program)(state).jaxpr
  decode = max(_while_bodies(jaxpr), key=lambda j: len(j.eqns))
  kv = (tcfg.num_key_value_heads, tcfg.head_dim)
  for eqn in decode.eqns:  # the caches the loop carries
    for v in eqn.invars:
      shape = tuple(getattr(v.aval, "shape", ()))
      if len(shape) == 5 and shape[0] == tcfg.num_hidden_layers:
        stacked.add(shape)
  found = sorted(set(_stacked_reads(decode, stacked)))
  assert not found, found
  carried = [tuple(v.aval.shape) for v in decode.invars]
  assert any(len(s) == 4 and (s[1], s[3]) == kv for s in carried), carried


# ---------------------------------------------------------------------------
# 3. Sampling statistics.
# ---------------------------------------------------------------------------


def _chi2_pvalue(counts, probs, min_expected=5.0) -> float:
  """p-value of counts ~ Multinomial(n, probs), small bins pooled.

  0 when some draw fell where probs is 0.
  """
  counts = np.asarray(counts, np.float64)
  probs = np.asarray(probs, np.float64)
  if (counts[probs <= 0] > 0).any():
    return 0.0
  keep = probs > 0
  counts = counts[keep]
  expected = probs[keep] / probs[keep].sum() * counts.sum()
  small = expected < min_expected
  if small.any():
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  return float(stats.chisquare(counts, expected).pvalue)


def _reference_probs(logits, *, temperature=1.0, top_k=0, top_p=1.0):
  """The sampling distribution, in numpy: softmax(l / T) restricted to the
  top-k, then to the smallest top set of (renormalised) mass >= top_p."""
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_k:
    p = np.where(z >= np.sort(z)[-top_k], p, 0.0)
    p /= p.sum()
  if top_p < 1.0:
    order = np.argsort(-p, kind="stable")
    above = np.cumsum(p[order]) - p[order]
    keep = np.zeros(p.shape, bool)
    keep[order[above < top_p]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


def _draw(logits, config, n, seed=0):
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  tokens, logp = sampling.select_tokens(jax.random.key(seed), rows, config)
  counts = np.bincount(np.asarray(tokens), minlength=len(logits))
  return counts, np.asarray(logp), np.asarray(tokens)


@pytest.mark.parametrize("vocab", [32, 1000])  # 1000: several blocks
def test_select_tokens_frequencies_pass_chi_square(vocab):
  logits = np.random.default_rng(0).standard_normal(vocab) * 1.5
  n = 20_000
  # T = 1: the model's distribution; wrong temperatures are rejected.
  counts, logp, tokens = _draw(logits, rollout.SamplingConfig(), n)
  assert _chi2_pvalue(counts, _reference_probs(logits)) > 1e-3
  for wrong in (0.8, 1.25):
    assert (
        _chi2_pvalue(counts, _reference_probs(logits, temperature=wrong)) < 1e-9
    )
  np.testing.assert_allclose(
      logp, np.log(_reference_probs(logits))[tokens], atol=1e-5
  )
  # T = 0.7 with top-p = 0.8; wrong T, wrong p and no top-p are rejected.
  config = rollout.SamplingConfig(temperature=0.7, top_p=0.8)
  counts, logp, tokens = _draw(logits, config, n, seed=1)
  right = _reference_probs(logits, temperature=0.7, top_p=0.8)
  assert _chi2_pvalue(counts, right) > 1e-3
  assert 3 <= (right > 0).sum() < vocab
  wrongs = [
      _reference_probs(logits, temperature=1.0, top_p=0.8),
      _reference_probs(logits, temperature=0.7, top_p=0.9),
      _reference_probs(logits, temperature=0.7, top_p=0.7),
      _reference_probs(logits, temperature=0.7),
  ]
  for wrong in wrongs:
    assert _chi2_pvalue(counts, wrong) < 1e-9
  # Log-probs are those of the unfiltered tempered distribution.
  np.testing.assert_allclose(
      logp,
      np.log(_reference_probs(logits, temperature=0.7))[tokens],
      atol=1e-5,
  )
  # Top-k = 5 at T = 1.
  counts, _, _ = _draw(logits, rollout.SamplingConfig(top_k=5), n, seed=2)
  right = _reference_probs(logits, top_k=5)
  assert set(np.flatnonzero(counts)) == set(np.flatnonzero(right))
  assert _chi2_pvalue(counts, right) > 1e-3
  assert _chi2_pvalue(counts, _reference_probs(logits, top_k=6)) < 1e-9


def _kept(logits, **config) -> set[int]:
  """Tokens drawn at least once over 20k draws, and `filter_logits`' set."""
  config = rollout.SamplingConfig(**config)
  counts, _, _ = _draw(logits, config, 20_000, seed=3)
  scaled = jnp.asarray(logits, jnp.float32) / config.temperature
  filtered = sampling.filter_logits(
      scaled, top_k=config.top_k, top_p=config.top_p
  )
  kept = set(np.flatnonzero(np.asarray(filtered) > jnp.finfo(jnp.float32).min))
  drawn = set(np.flatnonzero(counts))
  assert drawn <= kept, (drawn, kept)  # never a token outside the set
  return kept


def test_top_k_top_p_kept_sets_by_hand():
  logits = np.log([0.05, 0.5, 0.1, 0.2, 0.15])
  assert _kept(logits, top_k=2) == {1, 3}
  assert _kept(logits, top_p=0.3) == {1}
  assert _kept(logits, top_p=0.6) == {1, 3}  # 0.5 above token 3 < 0.6
  assert _kept(logits, top_p=0.75) == {1, 3, 4}  # 0.7 above token 4
  # k first, then p on the renormalised top 3 (0.59, 0.24, 0.18): token 4
  # has 0.82 > 0.8 above it (0.7 before renormalising).
  assert _kept(logits, top_k=3, top_p=0.8) == {1, 3}
  # Exact ties at the k-th value are kept.
  assert _kept(np.array([2.0, 2.0, 1.0, 0.0]), top_k=1) == {0, 1}
  # Greedy takes the first of tied maxima, as jnp.argmax.
  greedy = rollout.SamplingConfig(greedy=True)
  ties = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  tokens, _ = sampling.select_tokens(jax.random.key(0), ties, greedy)
  np.testing.assert_array_equal(tokens, [1, 0])
  # Every kept token is drawn (no token of the set is unreachable).
  counts, _, _ = _draw(logits, rollout.SamplingConfig(top_p=0.75), 20_000)
  assert set(np.flatnonzero(counts)) == {1, 3, 4}


def test_kept_sets_match_transformers_warpers():
  from transformers.generation import logits_process

  logits = np.random.default_rng(4).standard_normal((64, 500)) * 2
  for top_k, top_p in [(0, 0.5), (0, 0.9), (7, 1.0), (10, 0.7), (100, 0.95)]:
    ref = torch.tensor(logits, dtype=torch.float32)
    if top_k:
      ref = logits_process.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
      ref = logits_process.TopPLogitsWarper(top_p)(None, ref)
    ours = sampling.filter_logits(
        jnp.asarray(logits, jnp.float32), top_k=top_k, top_p=top_p
    )
    np.testing.assert_array_equal(
        np.asarray(ours) > jnp.finfo(jnp.float32).min,
        np.isfinite(ref.numpy()),
    )


def test_engine_first_token_frequencies_pass_chi_square(pair):
  config, _, _, model = pair
  rng = np.random.default_rng(5)
  batch = _prompt(
      _collate(config, [helpers.example(rng, "x", [(1, 6, 8)], 4, 6)])
  )
  g = 8192
  sampling = rollout.SamplingConfig(num_samples=g, max_new_tokens=1)
  out = rollout.Engine().sample(model, batch, jax.random.key(6), sampling)
  logits = _logits(
      model,
      batch["prompt_ids"],
      batch["prompt_mask"],
      batch["position_ids"],
      batch["vision"],
  )[0, -1]
  tokens = np.asarray(out.tokens[:, 0])
  counts = np.bincount(tokens, minlength=logits.shape[-1])
  probs = _reference_probs(logits)
  assert probs.max() > 0.05  # far from uniform (1/128)
  assert _chi2_pvalue(counts, probs) > 1e-3
  assert _chi2_pvalue(counts, _reference_probs(logits, temperature=1.25)) < 1e-6
  assert _chi2_pvalue(counts, _reference_probs(logits, top_p=0.9)) < 1e-6
  np.testing.assert_allclose(
      out.logprobs[:, 0], np.log(probs)[tokens], atol=TOL
  )


# ---------------------------------------------------------------------------
# 4-5. Buckets: one program each; sizes outside them are errors.
# ---------------------------------------------------------------------------


def test_one_compilation_per_bucket(pair):
  config, _, _, model = pair
  rng = np.random.default_rng(7)
  ex = functools.partial(helpers.example, rng)
  batches = [
      # Prompt bucket 32, patch bucket 64.
      [ex("s1", [(1, 4, 8)], 3, 7), ex("s2", [(1, 6, 6)], 10, 2)],
      [ex("s3", [(1, 8, 8)], 5, 8), ex("s4", [(1, 4, 4)], 2, 3)],
      # Prompt bucket 48, patch bucket 128.
      [ex("l1", [(1, 8, 12)], 4, 9), ex("l2", [(1, 6, 6)], 3, 3)],
      [ex("l3", [(1, 8, 10)], 12, 10), ex("l4", [(1, 4, 4)], 1, 1)],
  ]
  batches = [_prompt(_collate(config, b)) for b in batches]
  shapes = [
      (b["prompt_ids"].shape[1], b["vision"].num_patches) for b in batches
  ]
  assert shapes == [(32, 64), (32, 64), (48, 128), (48, 128)]
  assert len({tuple(b["prompt_mask"].sum(1)) for b in batches}) == 4
  engine = rollout.Engine(
      prompt_buckets=BUCKETS.prompt, patch_buckets=BUCKETS.patches
  )
  sampling = rollout.SamplingConfig(
      num_samples=2, max_new_tokens=4, temperature=0.9
  )
  first = [
      engine.sample(model, b, jax.random.key(0), sampling) for b in batches
  ]
  assert engine.compilations == 2
  for _ in range(2):
    again = [
        engine.sample(model, b, jax.random.key(0), sampling) for b in batches
    ]
    engine.sample(model, batches[0], jax.random.key(9), sampling)
  assert engine.compilations == 2
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x.tokens, y.tokens)
  # A different sampling config is a different program.
  engine.sample(model, batches[0], jax.random.key(0), SAMPLED)
  assert engine.compilations == 3


def test_sizes_outside_the_buckets_are_errors(pair):
  config, _, _, model = pair
  rng = np.random.default_rng(8)
  engine = rollout.Engine(
      prompt_buckets=BUCKETS.prompt, patch_buckets=BUCKETS.patches
  )
  sampling = rollout.SamplingConfig(max_new_tokens=4)
  # Padded to 40 (not a bucket) by hand.
  odd = data.Buckets(prompt=(40,), patches=(64,), response=(8,))
  batch = _prompt(
      _collate(config, [helpers.example(rng, "o", [(1, 4, 8)], 3, 3)], odd)
  )
  with pytest.raises(ValueError, match=r"prompt length 40 is not a bucket"):
    engine.sample(model, batch, jax.random.key(0), sampling)
  odd = data.Buckets(prompt=(32,), patches=(96,), response=(8,))
  batch = _prompt(
      _collate(config, [helpers.example(rng, "o", [(1, 4, 8)], 3, 3)], odd)
  )
  with pytest.raises(ValueError, match=r"patch count 96 is not a bucket"):
    engine.sample(model, batch, jax.random.key(0), sampling)
  assert engine.compilations == 0
  # Examples larger than every bucket never reach the sampler.
  fine = helpers.example(rng, "fine", [(1, 4, 4)], 3, 3)
  long = helpers.example(rng, "long-1", [(1, 4, 4)], 50, 3)  # 59 > 48 tokens
  big = helpers.example(rng, "big-1", [(1, 12, 12)], 1, 1)  # 144 > 128 patches
  with pytest.raises(data.BucketError, match=r"'long-1'.*prompt length of 59"):
    _collate(config, [fine, long])
  with pytest.raises(data.BucketError, match=r"'big-1'.*image patches of 144"):
    _collate(config, [big, fine])
  it = data.BatchIterator(
      [fine, long, fine, big, fine],
      lambda ex: ex,
      batch_size=3,
      model_config=config,
      buckets=BUCKETS,
      shuffle=False,
      num_epochs=1,
      on_overflow="skip",
  )
  assert [len(b.meta["ids"]) for b in it] == [3]
  assert it.get_state()["skipped"] == 2


# ---------------------------------------------------------------------------
# 6. The counterfactual branch: score under another image.
# ---------------------------------------------------------------------------


def test_score_under_another_image_equals_full_forward(pair, image_batch):
  config, _, _, model = pair
  examples, batch = image_batch
  g, r = 2, 10
  rng = np.random.default_rng(9)
  lengths = np.array([10, 4, 7, 10, 1, 6])
  mask = np.arange(r)[None] < lengths[:, None]
  tokens = np.where(mask, rng.integers(3, 110, size=(6, r)), PAD)
  cf = batch["cf_vision"]
  prompt = _prompt(batch)
  kw = dict(num_samples=g, temperature=1.0)
  ours_cf = _score(model, prompt, tokens, mask, cf, **kw)
  ours = _score(model, prompt, tokens, mask, None, **kw)

  # Reference: one plain forward over prompt + response, positions from
  # `rope_index` over the whole sequence.
  rep = lambda x: np.repeat(np.asarray(x), g, axis=0)
  ids = np.concatenate([rep(batch["prompt_ids"]), tokens], 1)
  full_mask = np.concatenate([rep(batch["prompt_mask"]), mask], 1)
  grids = [ex.grids for ex in examples for _ in range(g)]
  pos, _ = inputs_lib.rope_index(ids, full_mask, grids, config)
  tp = batch["prompt_ids"].shape[1]

  def reference(vision):
    logits = _logits(model, ids, full_mask, pos, jax.tree.map(rep, vision))
    logp = jax.nn.log_softmax(logits[:, tp - 1 : tp - 1 + r], -1)
    return np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]

  ref_cf = reference(cf)
  np.testing.assert_array_less(np.abs(ours_cf - ref_cf)[mask], TOL)
  np.testing.assert_array_less(
      np.abs(ours - reference(batch["vision"]))[mask], TOL
  )
  assert np.abs(ours_cf - ours)[mask].max() > 0.05  # the image matters


# ---------------------------------------------------------------------------
# 7. Stop tokens.
# ---------------------------------------------------------------------------

_CALLS: list[int] = []


class _Counting(qwen2_5_vl.Qwen2_5_VL):
  """Records the length of every forward pass executed at run time."""

  def __call__(self, input_ids, **kwargs):
    t = input_ids.shape[1]
    jax.debug.callback(lambda: _CALLS.append(t))
    return super().__call__(input_ids, **kwargs)


def test_stop_tokens_end_responses_and_the_loop(pair, image_batch):
  config, _, _, model = pair
  counting = nnx.eval_shape(lambda: _Counting(config, rngs=nnx.Rngs(0)))
  nnx.update(counting, nnx.state(model))  # the same weights
  batch = _prompt(image_batch[1])
  engine = rollout.Engine()

  def run(r, stop):
    _CALLS.clear()
    sampling = rollout.SamplingConfig(
        max_new_tokens=r, greedy=True, stop_tokens=stop, pad_token=PAD
    )
    out = engine.sample(counting, batch, jax.random.key(0), sampling)
    out = jax.tree.map(np.asarray, out)
    jax.effects_barrier()
    assert _CALLS[0] == 48 and set(_CALLS[1:]) == {1}
    return out, len(_CALLS) - 1  # decode steps

  # The prompt's forward gives the first token; each decoding step runs
  # the forward of one more token: R - 1 of them, none past the last token.
  free, steps = run(12, ())
  assert steps == 11 and free.truncated.all() and (free.lengths == 12).all()
  # Row 0 stops, row 1 does not: the loop runs all R - 1 steps.
  stop, at = _pick_stop(free.tokens, stop_row=0, free_rows=[1], hi=10)
  out, steps = run(12, (stop,))
  assert steps == 11
  assert not out.truncated[0] and out.lengths[0] == at + 1
  np.testing.assert_array_equal(
      out.tokens[0, : at + 1], free.tokens[0, : at + 1]
  )
  np.testing.assert_array_equal(
      out.logprobs[0, : at + 1], free.logprobs[0, : at + 1]
  )
  assert (out.tokens[0, at + 1 :] == PAD).all()
  assert not out.mask[0, at + 1 :].any() and out.mask[0, : at + 1].all()
  assert (out.logprobs[0, at + 1 :] == 0).all()
  assert out.truncated[1] and out.lengths[1] == 12 and out.mask[1].all()
  np.testing.assert_array_equal(out.tokens[1], free.tokens[1])
  # Every row emits one of these by step 4: the loop ends there, whatever R
  # (no forward of the last stop token).
  stops = tuple(sorted({int(t) for t in free.tokens[:, 4]}))
  short, steps_short = run(12, stops)
  long, steps_long = run(40, stops)
  ends = [
      int(np.flatnonzero(np.isin(row, stops))[0]) + 1 for row in free.tokens
  ]
  np.testing.assert_array_equal(short.lengths, ends)
  assert max(ends) <= 5 and steps_short == steps_long == max(ends) - 1
  assert not short.truncated.any()
  for key in ("tokens", "logprobs", "mask", "lengths", "truncated"):
    a, b = getattr(short, key), getattr(long, key)
    if a.ndim == 2:
      assert (b[:, 12:] == (PAD if key == "tokens" else 0)).all()
      b = b[:, :12]
    # Log-probs: a longer cache changes the order of the attention sums.
    tol = 1e-6 if key == "logprobs" else 0
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
