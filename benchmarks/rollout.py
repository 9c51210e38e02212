r"""Sampling speed: `rollout.Engine.sample` vs `transformers`' `generate`.

  python benchmarks/rollout.py                  # batch 8, 64 new tokens
  python benchmarks/rollout.py --threads=1 --vocab=448 --repeats=5

The same random model (text 256 wide x 4 layers, vocab 32000 by default;
vision 128 wide x 4 blocks), the same 8 prompts with one image each (112
to 224 px, mixed sizes, prompts left-padded), exactly 64 new tokens on both
sides (no stop token, so neither stops early), greedy (or sampling at T=1
with `--top_p`), float32 on CPU. `--threads=N` pins the process to N cores
and gives torch N threads (default: every core). Our program is compiled
once before timing; each timed call encodes the images, prefills and
decodes; the runs are timed in alternation so that a busy machine slows
both alike. Prints tokens per second of both and their ratio, then the
split between images + prefill and each further decoding step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import timing

IMAGE_SIZES = ((112, 112), (224, 224), (168, 112), (112, 224), (196, 140))


def small_config(vocab: int = 32000):
  from faithful_rl.models.config import ModelConfig
  from faithful_rl.models.config import TextConfig
  from faithful_rl.models.config import VisionConfig

  return ModelConfig(
      text=TextConfig(
          vocab_size=vocab,
          hidden_size=256,
          intermediate_size=704,
          num_hidden_layers=4,
          num_attention_heads=4,
          num_key_value_heads=2,
          mrope_section=(8, 12, 12),
          tie_word_embeddings=False,
      ),
      vision=VisionConfig(
          depth=4,
          hidden_size=128,
          intermediate_size=256,
          num_heads=2,
          out_hidden_size=256,
          fullatt_block_indexes=(1, 3),
      ),
      image_token_id=vocab - 1,
      vision_start_token_id=vocab - 3,
      vision_end_token_id=vocab - 2,
      video_token_id=vocab - 4,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
  )


def make_inputs(config, batch: int, seed: int = 0):
  """Left-padded prompts, one image each: (ids, mask, pixels, grids)."""
  rng = np.random.default_rng(seed)
  patch = config.vision.patch_size
  prompts, pix, grids = [], [], []
  for i in range(batch):
    h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    grid = (1, h // patch, w // patch)
    n_img = grid[1] * grid[2] // 4
    prompt = (
        list(rng.integers(3, config.text.vocab_size - 4, 8 + 3 * i))
        + [config.vision_start_token_id]
        + [config.image_token_id] * n_img
        + [config.vision_end_token_id]
        + list(rng.integers(3, config.text.vocab_size - 4, 20))
    )
    prompts.append(prompt)
    n = grid[1] * grid[2]
    pix.append(rng.standard_normal((n, config.vision.patch_dim), np.float32))
    grids.append([grid])
  length = max(len(p) for p in prompts)
  ids = np.zeros((batch, length), np.int64)
  mask = np.zeros((batch, length), np.int64)
  for i, p in enumerate(prompts):
    ids[i, length - len(p) :] = p
    mask[i, length - len(p) :] = 1
  return ids, mask, pix, grids


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--threads", type=int, default=0, help="0: all cores")
  parser.add_argument(
      "--top_p", type=float, default=0.0, help="sample at T=1 (0: greedy)"
  )
  args = parser.parse_args(argv)

  cores = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(cores)
  os.sched_setaffinity(0, cores[:threads])  # before XLA starts its pool
  if threads == 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

  import jax
  import jax.numpy as jnp
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  from faithful_rl import models
  from faithful_rl import rollout
  from faithful_rl.models import inputs as inputs_lib

  torch.set_num_threads(threads)
  config = small_config(args.vocab)
  torch.manual_seed(0)
  hf = Qwen2_5_VLForConditionalGeneration(config.to_hf()).eval()
  hf.generation_config.eos_token_id = None  # never stop early
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = models.from_pretrained(d)

  b, r = args.batch, args.new_tokens
  ids, mask, pix, grids = make_inputs(config, b)
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)
  patches = inputs_lib.bucket_patches(grids, config.vision)
  batch = dict(
      prompt_ids=jnp.asarray(ids, jnp.int32),
      prompt_mask=jnp.asarray(mask, bool),
      position_ids=jnp.asarray(pos),
      vision=jax.tree.map(
          jnp.asarray,
          inputs_lib.vision_inputs(pix, grids, patches, config.vision),
      ),
  )
  engine = rollout.Engine()

  def ours(new_tokens):
    sampling = rollout.SamplingConfig(
        max_new_tokens=new_tokens,
        greedy=not args.top_p,
        top_p=args.top_p or 1.0,
        stop_tokens=(),
    )
    out = engine.sample(model, batch, jax.random.key(0), sampling)
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  out = ours(r)  # compiles
  compile_s = time.perf_counter() - t0
  assert (np.asarray(out.lengths) == r).all()
  ours(1)

  hf_kwargs = dict(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(np.concatenate(pix)),
      image_grid_thw=torch.tensor([g for gs in grids for g in gs]),
      mm_token_type_ids=torch.tensor(
          (ids == config.image_token_id).astype(np.int64)
      ),
      pad_token_id=0,
  )
  if args.top_p:
    hf_kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=args.top_p)
  else:
    hf_kwargs.update(do_sample=False)

  def theirs(new_tokens):
    with torch.no_grad():
      return hf.generate(**hf_kwargs, max_new_tokens=new_tokens)

  ref = theirs(r)  # warm-up
  ref = ref[:, ids.shape[1] :].numpy()
  assert ref.shape == (b, r), ref.shape
  t_ours, t_hf, t_ours1, t_hf1 = timing.alternate(
      [lambda: ours(r), lambda: theirs(r), lambda: ours(1), lambda: theirs(1)],
      args.repeats,
  )

  n = b * r
  agree = float((np.asarray(out.tokens) == ref).mean())
  mode = f"T=1, top-p {args.top_p}" if args.top_p else "greedy"
  sizes = [f"{g[0][1] * 14}x{g[0][2] * 14}" for g in grids]
  print(
      f"config: text 256x4 (vocab {args.vocab}), vision 128x4; batch {b};"
      f" prompts of {ids.shape[1]} tokens (left-padded); images {sizes};"
      f" {r} new tokens ({mode}, no stop); float32; {threads} thread(s)"
  )
  print(
      f"ours (rollout.Engine.sample) {t_ours * 1e3:8.1f} ms {n / t_ours:8.1f}"
      " tok/s"
  )
  print(
      f"transformers generate        {t_hf * 1e3:8.1f} ms {n / t_hf:8.1f} tok/s"
  )
  print(f"speed-up: {t_hf / t_ours:.2f}x (goal >= 3x)")
  step = lambda t, t1: (t - t1) / max(r - 1, 1) * 1e3
  print(
      f"images + prefill + 1st token: ours {t_ours1 * 1e3:.1f} ms, transformers"
      f" {t_hf1 * 1e3:.1f} ms; each further token: ours"
      f" {step(t_ours, t_ours1):.2f} ms, transformers {step(t_hf, t_hf1):.2f}"
      f" ms ({(t_hf - t_hf1) / (t_ours - t_ours1):.2f}x); our compile"
      f" {compile_s:.1f} s"
  )
  if not args.top_p:
    print(f"greedy tokens equal to transformers': {agree:.1%}")


if __name__ == "__main__":
  main()
