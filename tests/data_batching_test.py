"""Bucketed collation and the seeded, resumable batch iterator."""

import json

import numpy as np
import pytest

from faithful_rl import data
from faithful_rl.data import synthetic
from faithful_rl.models import inputs as inputs_lib
import helpers

BUCKETS = data.Buckets(prompt=(64, 128), patches=(64, 256), response=(32, 64))


@pytest.fixture(scope="module")
def processor():
  return data.processor_for(data.demo_tokenizer_dir())


@pytest.fixture(scope="module")
def config(processor):
  return (
      helpers.tiny_config()
      .replace(**processor.ids.model_config_kwargs())
      .replace_text(vocab_size=448)
  )


@pytest.fixture(scope="module")
def records():
  small = list(synthetic.generate(synthetic.SyntheticConfig(), "train", 20))
  big = synthetic.SyntheticConfig(image_sizes=((224, 224),))
  return small + list(synthetic.generate(big, "train", 3, start=20))


def test_collate_pads_into_buckets(processor, config, records):
  exs = [processor(records[i]) for i in (0, 5, 21)]  # 21: 224 px, 64 tokens
  batch = data.collate(exs, model_config=config, buckets=BUCKETS, batch_size=4)
  a = batch.arrays
  assert a["prompt_ids"].shape == (4, 128) and a["prompt_ids"].dtype == np.int32
  assert a["vision"].pixel_values.shape == (4, 256, 1176)
  assert a["ease_target"].shape == (4, 64) and a["response_ids"].shape == (
      4,
      32,
  )
  np.testing.assert_array_equal(a["example_mask"], [1, 1, 1, 0])
  for i, ex in enumerate(exs):
    lp = len(ex.prompt_ids)
    # Left padding with the pad id; the prompt sits at the end.
    np.testing.assert_array_equal(a["prompt_ids"][i, -lp:], ex.prompt_ids)
    assert (a["prompt_ids"][i, :-lp] == processor.ids.pad).all()
    assert a["prompt_mask"][i].sum() == lp and a["prompt_mask"][i, -lp:].all()
    lr = len(ex.response_ids)
    np.testing.assert_array_equal(a["response_ids"][i, :lr], ex.response_ids)
    assert a["response_mask"][i].sum() == lr
    # Positions of the padded row equal those of the unpadded prompt.
    pos, delta = inputs_lib.rope_index(
        ex.prompt_ids[None], None, [ex.grids], config
    )
    np.testing.assert_array_equal(a["position_ids"][:, i, -lp:], pos[:, 0])
    assert a["rope_deltas"][i] == delta[0]
    v = ex.num_visual_tokens
    np.testing.assert_allclose(a["ease_target"][i].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(a["focus_target"][i].sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a["evidence_mask"][i, :v], ex.evidence_mask)
    assert not a["evidence_mask"][i, v:].any()
    np.testing.assert_array_equal(
        a["cf_vision"].pixel_values[i, : ex.num_patches], ex.cf_pixel_values
    )
    np.testing.assert_array_equal(a["vision"].token_valid[i].sum(), v)
  # Counterfactual vision shares the layout, not the pixels.
  np.testing.assert_array_equal(
      a["cf_vision"].patch_index, a["vision"].patch_index
  )
  assert batch.meta["ids"] == [e.id for e in exs]
  assert batch.meta["answers"] == [e.answer for e in exs]


def test_overflow_is_an_error_naming_the_record(processor, config, records):
  tight = data.Buckets(prompt=(64,), patches=(64,), response=(32,))
  ex = processor(records[21])
  few_patches = data.Buckets(prompt=(128,), patches=(64,), response=(32,))
  with pytest.raises(data.BucketError, match="train-0000021.*image patches"):
    data.collate([ex], model_config=config, buckets=few_patches)
  with pytest.raises(data.BucketError, match="train-0000021.*prompt length"):
    data.collate([ex], model_config=config, buckets=tight)
  it = data.BatchIterator(
      records,
      processor,
      batch_size=4,
      model_config=config,
      buckets=tight,
      shuffle=False,
  )
  with pytest.raises(data.BucketError, match="record 'train-0000020'"):
    for _ in range(6):
      next(it)
  skip = data.BatchIterator(
      records,
      processor,
      batch_size=4,
      model_config=config,
      buckets=tight,
      shuffle=False,
      num_epochs=1,
      on_overflow="skip",
      drop_remainder=False,
  )
  ids = [i for b in skip for i in b.meta["ids"]]
  assert ids == [f"train-{i:07d}" for i in range(20)]
  assert skip.get_state()["skipped"] == 3


def run(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert a.meta["ids"] == b.meta["ids"]
  for key in ("prompt_ids", "ease_target", "response_ids", "position_ids"):
    np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
  np.testing.assert_array_equal(
      a.arrays["vision"].pixel_values, b.arrays["vision"].pixel_values
  )


def test_iteration_is_deterministic_and_resumes_exactly(
    processor, config, records
):
  make = lambda seed: data.BatchIterator(  # pylint: disable=g-long-lambda
      records[:20],
      processor,
      batch_size=3,
      model_config=config,
      buckets=BUCKETS,
      seed=seed,
  )
  first = run(make(7), 9)  # 27 records: crosses the first epoch boundary
  again = run(make(7), 9)
  for x, y in zip(first, again):
    assert_same(x, y)
  other = run(make(8), 2)
  assert other[0].meta["ids"] != first[0].meta["ids"]
  # Each epoch is a permutation of all records.
  ids = [i for b in first for i in b.meta["ids"]]
  assert sorted(ids[:20]) == sorted(r["id"] for r in records[:20])
  # Save after 4 batches (JSON round trip), restore into a fresh iterator.
  it = make(7)
  run(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {
      "seed": 7,
      "epoch": 0,
      "position": 12,
      "num_records": 20,
      "shard": [0, 1],
      "skipped": 0,
  }
  resumed = make(0)
  resumed.set_state(state)
  for x, y in zip(run(resumed, 5), first[4:]):
    assert_same(x, y)


def test_orbax_checkpoint_of_the_iterator(processor, config, records, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  make = lambda: data.BatchIterator(  # pylint: disable=g-long-lambda
      records[:20],
      processor,
      batch_size=4,
      model_config=config,
      buckets=BUCKETS,
      seed=3,
      num_threads=2,
  )
  it = make()
  run(it, 2)
  mngr = ocp.CheckpointManager(
      tmp_path / "ckpt",
      item_handlers={"data": grain.checkpoint.CheckpointHandler()},
  )
  mngr.save(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))
  )
  mngr.wait_until_finished()
  expected = run(it, 2)
  restored = make()
  mngr.restore(
      2,
      args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(restored)
      ),
  )
  assert restored.get_state()["position"] == 8
  for x, y in zip(run(restored, 2), expected):
    assert_same(x, y)


def test_last_batch_padded_or_dropped_and_shards(processor, config, records):
  kw = dict(model_config=config, buckets=BUCKETS, shuffle=False, num_epochs=1)
  padded = list(
      data.BatchIterator(
          records[:7], processor, batch_size=3, drop_remainder=False, **kw
      )
  )
  assert [b.meta["ids"] for b in padded][-1] == ["train-0000006"]
  np.testing.assert_array_equal(padded[-1].arrays["example_mask"], [1, 0, 0])
  assert not padded[-1].arrays["prompt_mask"][1:].any()
  dropped = list(data.BatchIterator(records[:7], processor, batch_size=3, **kw))
  assert len(dropped) == 2
  shards = [
      [
          i
          for b in data.BatchIterator(
              records[:8],
              processor,
              batch_size=2,
              shard=(k, 2),
              seed=1,
              **dict(kw, shuffle=True),
          )
          for i in b.meta["ids"]
      ]
      for k in range(2)
  ]
  assert not set(shards[0]) & set(shards[1])
  assert len(shards[0]) + len(shards[1]) == 8
