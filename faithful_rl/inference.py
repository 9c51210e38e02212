"""Using a trained policy: load a run or a HF folder, answer, look.

  model, processor, config = inference.load_run("workdirs/demo")
  answers = inference.answer(model, processor, records)
  # each: question, response, answer, correct, attention float[h, w]
  # (the response's visual attention on the merged-token grid), image,
  # boxes, grid

`python -m faithful_rl.export --workdir=W --out=DIR` writes a run as a HF
folder (`faithful_rl.export`).

The attention is read by the probe at EASE's layer floor(2L/3) (or the
given layers), averaged over heads, over up to 64 response tokens, and
renormalised over the image's visual tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from faithful_rl import checkpointing
from faithful_rl import forward
from faithful_rl import models
from faithful_rl import rewards as rewards_lib
from faithful_rl import rollout
from faithful_rl.data import batching
from faithful_rl.data import processing


def load_config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_model(workdir: str, step: int | None = None, config=None):
  """The model of a training run's checkpoint at `step` (default: the
  latest), its parameters in the run's parameter dtype."""
  from faithful_rl import run_setup  # pylint: disable=g-import-not-at-top

  config = config or load_config(workdir)
  model_config = run_setup.model_config_for(config)
  dtype = jnp.dtype(config.model.dtype)
  options = run_setup.model_options(config)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(
          lambda: models.create(model_config, dtype=dtype, **options)
      )
  )
  params = checkpointing.load_params(
      workdir, nnx.to_pure_dict(abstract), step=step
  )
  return nnx.merge(graphdef, params)


def load_run(workdir: str, step: int | None = None):
  """(model, processor, config) of a training run's checkpoint."""
  from faithful_rl import run_setup  # pylint: disable=g-import-not-at-top

  config = load_config(workdir)
  model = load_model(workdir, step, config)
  processor = run_setup.make_processor(config, model.config)
  return model, processor, config


def load_hf(hf_dir: str, dtype=jnp.float32, **processor_options):
  """(model, processor) of a local HF folder."""
  model = models.from_pretrained(hf_dir, dtype=dtype)
  processor = processing.processor_for(
      hf_dir, model_config=model.config, **processor_options
  )
  return model, processor


def answer(
    model,
    processor,
    records: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    probe_layers: tuple[int, ...] = (),
    buckets: batching.Buckets | None = None,
) -> list[dict[str, Any]]:
  """Greedy answers to `records`, with where each response looked."""
  examples = [processor.process(r) for r in records]
  # Patch buckets in whole attention windows (64 patches at window 112).
  window = model.config.vision.window_patches
  buckets = buckets or batching.Buckets(
      prompt=(64, 128, 256, 512, 1024),
      patches=tuple(window * k for k in (1, 4, 16, 64)),
      response=(max_new_tokens,),
  )
  batch = batching.collate(
      examples,
      model_config=model.config,
      buckets=buckets,
      truncate_response=True,
  )
  a = batch.arrays
  prompt = {
      k: jax.tree.map(jnp.asarray, a[k])
      for k in ("prompt_ids", "prompt_mask", "position_ids", "vision")
  }
  sampling = rollout.SamplingConfig(
      num_samples=1,
      max_new_tokens=max_new_tokens,
      greedy=True,
      stop_tokens=(processor.ids.im_end,),
      pad_token=processor.ids.pad,
  )
  ro = rollout.sample(model, prompt, jax.random.key(0), sampling)
  attn, _, _ = forward.response_attention(
      model,
      prompt,
      ro.tokens,
      ro.mask,
      jax.random.key(0),
      num_visual=a["ease_target"].shape[1],
      num_queries=min(64, max_new_tokens),
      layers=probe_layers,
  )
  attn = np.asarray(attn)
  n = len(records)
  texts = processor.decode_responses(
      np.asarray(ro.tokens)[:n], np.asarray(ro.mask)[:n]
  )
  results = []
  for i, (rec, ex) in enumerate(zip(records, examples)):
    text = texts[i]
    t, h, w = ex.grids[0]
    m = processor.merge_size
    gh, gw = h // m, w // m
    image = processing.load_image(processing.record_images(rec)[0])
    results.append(
        dict(
            id=ex.id,
            question=rec["question"],
            response=text,
            answer=ex.answer,
            correct=bool(
                rewards_lib.verify(text, ex.answer, ex.answer_type) > 0.5
            ),
            attention=attn[i, : gh * gw].reshape(gh, gw),
            evidence=np.asarray(a["evidence_mask"][i, : gh * gw]).reshape(
                gh, gw
            ),
            grid=(gh, gw),
            image=image,
            boxes=np.asarray(rec.get("boxes", np.zeros((0, 4))), np.float32),
        )
    )
  return results
