r"""Forward speed vs `transformers`, and peak host memory of loading.

  python benchmarks/forward.py                 # both parts, both families
  python benchmarks/forward.py --skip_memory   # speed only
  python benchmarks/forward.py --skip_memory --family=qwen3_vl

Speed, per family: our jitted forward and `transformers`'
Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration
(torch, eval, no_grad, same thread count) on the same mid-sized random
config (text hidden 512 x 8 layers, vision hidden 512 x 8 blocks, one
448x448 image per example, batch 2), float32 on CPU. The runs alternate, so
that a busy machine slows both alike. Prints the median time of each, the
ratio, and the split between the vision tower and the rest; then the
forward's linear layers alone (its GEMMs, at the same shapes, in XLA and in
torch), which bound from below what either forward can take.

Memory: writes a ~1B-parameter checkpoint in bfloat16 as several shards,
then loads it with `models.from_pretrained` in a fresh process and prints
its peak resident memory beside the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import timing


def mid_config(family: str = "qwen2_5_vl"):
  from faithful_rl.models.config import QWEN3_TEXT
  from faithful_rl.models.config import ModelConfig
  from faithful_rl.models.config import Qwen3VisionConfig
  from faithful_rl.models.config import TextConfig
  from faithful_rl.models.config import VisionConfig

  vision = dict(depth=8, hidden_size=512, intermediate_size=1024)
  vision.update(num_heads=8, out_hidden_size=512)
  if family == "qwen3_vl":  # Qwen3-VL's blocks at the same widths
    base = mid_config()
    return base.replace(
        family=family,
        text=base.text.replace(
            head_dim=64, mrope_section=(12, 10, 10), **QWEN3_TEXT
        ),
        vision=Qwen3VisionConfig(deepstack_visual_indexes=(1, 3, 5), **vision),
    )
  return ModelConfig(
      text=TextConfig(
          vocab_size=32000,
          hidden_size=512,
          intermediate_size=1408,
          num_hidden_layers=8,
          num_attention_heads=8,
          num_key_value_heads=2,
          mrope_section=(8, 12, 12),
          tie_word_embeddings=False,
      ),
      vision=VisionConfig(fullatt_block_indexes=(3, 7), **vision),
      image_token_id=31999,
      vision_start_token_id=31997,
      vision_end_token_id=31998,
      video_token_id=31996,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
  )


def linear_layers(params, patches: int, merged: int, tokens: int):
  """[(rows, kernel)] for every linear layer of one forward: each kernel
  (a stacked one once per layer) with the rows it multiplies: the patch
  slots in the vision tower, the merged visual tokens in its mergers, the
  text tokens in the language model and its head."""
  import jax  # pylint: disable=g-import-not-at-top

  from faithful_rl import sharding  # pylint: disable=g-import-not-at-top

  out = []
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    name = sharding.path_str(path)
    if not name.endswith("kernel") or w.ndim < 2:
      continue
    if name.startswith("visual"):
      rows = merged if "merger" in name else patches
    else:
      rows = tokens
    for layer in w.reshape(-1, *w.shape[-2:]):
      out.append((rows, layer))
  return out


def matmuls_alone(layers, repeats: int):
  """Median seconds of the forward's linear layers alone (same shapes,
  float32, no attention, norms or anything else) in XLA and in torch, and
  their FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  xs = [
      rng.standard_normal((rows, w.shape[0]), np.float32) for rows, w in layers
  ]
  ws = [np.asarray(w, np.float32) for _, w in layers]
  flops = sum(
      2.0 * x.shape[0] * x.shape[1] * w.shape[1] for x, w in zip(xs, ws)
  )
  ours = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws)])
  j_xs, j_ws = jax.device_put(xs), jax.device_put(ws)
  t_xs, t_ws = [torch.from_numpy(x) for x in xs], [
      torch.from_numpy(w) for w in ws
  ]

  def theirs():
    with torch.no_grad():
      return [x @ w for x, w in zip(t_xs, t_ws)]

  calls = [lambda: jax.block_until_ready(ours(j_xs, j_ws)), theirs]
  for call in calls:
    call()
  t_ours, t_theirs = timing.alternate(calls, repeats)
  return t_ours, t_theirs, flops


def bench_speed(repeats: int, family: str):
  import jax
  import torch
  import transformers

  from faithful_rl import models
  from faithful_rl.models import inputs as inputs_lib

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  config = mid_config(family)
  hf_class = getattr(
      transformers,
      {
          "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
          "qwen3_vl": "Qwen3VLForConditionalGeneration",
      }[family],
  )
  torch.manual_seed(0)
  hf = hf_class(config.to_hf()).eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = models.from_pretrained(d)

  rng = np.random.default_rng(0)
  side = 448 // config.vision.patch_size  # 448 x 448 px
  grid = (1, side, side)
  n_img = side * side // 4
  prompt = (
      [5] * 10
      + [config.vision_start_token_id]
      + [config.image_token_id] * n_img
      + [config.vision_end_token_id]
      + list(rng.integers(3, 30000, 40))
  )
  ids = np.array([prompt, prompt], np.int64)
  mask = np.ones_like(ids)
  pix = rng.standard_normal(
      (2 * side * side, config.vision.patch_dim), np.float32
  )
  thw = np.array([grid, grid])

  pix_list, grids = inputs_lib.split_hf_images(ids, pix, thw, config)
  # The patch bucket is the layout's exact size (no padding slots), so that
  # both sides process the same patches.
  bucket = max(inputs_lib.layout_patches(g, config.vision) for g in grids)
  vis = inputs_lib.vision_inputs(pix_list, grids, bucket, config.vision)
  pos, _ = inputs_lib.rope_index(ids, mask, grids, config)

  from flax import nnx

  # Pure functions of the parameters, as the trainer and the sampler jit
  # them (`nnx.jit` would also return, and so copy, the whole model).
  graphdef, params = nnx.split(model)

  @jax.jit
  def forward(params, ids, mask, pos, vis):
    m = nnx.merge(graphdef, params)
    return m(ids, attention_mask=mask, position_ids=pos, vision=vis).logits

  @jax.jit
  def vision_tower(params, vis):
    m = nnx.merge(graphdef, params)
    if family == "qwen3_vl":  # its tower also gives the DeepStack features
      return m.vision_features(vis)
    return m.encode_images(vis)

  args = [jax.numpy.asarray(x) for x in (ids, mask, pos)]
  vis = jax.tree.map(jax.numpy.asarray, vis)
  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
  t_pix, t_thw = torch.tensor(pix), torch.tensor(thw)
  t_mm = torch.tensor((ids == config.image_token_id).astype(np.int64))

  def reference():
    with torch.no_grad():
      hf(
          input_ids=t_ids,
          attention_mask=t_mask,
          pixel_values=t_pix,
          image_grid_thw=t_thw,
          mm_token_type_ids=t_mm,
      )

  def reference_vision():
    with torch.no_grad():
      hf.model.visual(t_pix, grid_thw=t_thw)

  calls = [
      lambda: forward(params, *args, vis).block_until_ready(),
      reference,
      lambda: jax.block_until_ready(vision_tower(params, vis)),
      reference_vision,
  ]
  for call in calls:
    call()  # warm-up (and compile)
  ours, ref, ours_vis, ref_vis = timing.alternate(calls, repeats)
  b = ids.shape[0]  # each row has its own bucket of patch slots
  merged = bucket // config.vision.merge_unit
  mm_ours, mm_ref, flops = matmuls_alone(
      linear_layers(nnx.to_pure_dict(params), b * bucket, b * merged, ids.size),
      repeats,
  )
  print(
      f"{family} forward, batch 2 x (1 image 448x448 + {ids.shape[1] - n_img}"
      " text"
      f" tokens), T={ids.shape[1]}, float32, {threads} CPU threads"
  )
  print(f"  faithful_rl (jax.jit): {ours * 1e3:8.1f} ms")
  print(f"  transformers (torch):  {ref * 1e3:8.1f} ms")
  print(f"  ratio transformers/ours: {ref / ours:.2f}x")
  print(
      f"  of which the vision tower: ours {ours_vis * 1e3:.1f} ms,"
      f" transformers {ref_vis * 1e3:.1f} ms ({ref_vis / ours_vis:.2f}x);"
      f" the rest: ours {(ours - ours_vis) * 1e3:.1f} ms, transformers"
      f" {(ref - ref_vis) * 1e3:.1f} ms"
      f" ({(ref - ref_vis) / (ours - ours_vis):.2f}x)"
  )
  print(
      f"  the linear layers alone ({flops / 1e9:.0f} GFLOP, same shapes):"
      f" XLA {mm_ours * 1e3:.1f} ms ({flops / mm_ours / 1e9:.0f} GFLOP/s),"
      f" torch {mm_ref * 1e3:.1f} ms ({flops / mm_ref / 1e9:.0f} GFLOP/s);"
      f" everything else: ours {(ours - mm_ours) * 1e3:.1f} ms,"
      f" transformers {(ref - mm_ref) * 1e3:.1f} ms"
  )


def _write_big_checkpoint(path: str):
  import jax.numpy as jnp

  from faithful_rl import models

  config = mid_config()
  config = config.replace_text(
      vocab_size=32000,
      hidden_size=2048,
      intermediate_size=5504,
      num_hidden_layers=16,
      num_attention_heads=16,
      num_key_value_heads=4,
      mrope_section=(16, 24, 24),
  ).replace_vision(out_hidden_size=2048)
  model = models.create(config, dtype=jnp.bfloat16)
  models.save_pretrained(model, path, max_shard_bytes=512 * 1024**2)
  n = sum(x.size for x in __import__("jax").tree.leaves(model))
  return n


def _peak_rss() -> int:
  """This process's peak resident memory in bytes (VmHWM; reset by exec,
  unlike getrusage's ru_maxrss, which a child inherits from its parent)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def _load_and_report(path: str):
  """Runs in a fresh process: load, then print peak RSS."""
  import jax
  import jax.numpy as jnp

  from faithful_rl import models

  jnp.zeros(1).block_until_ready()  # runtime up before the baseline
  base = _peak_rss()
  t0 = time.perf_counter()
  model = models.from_pretrained(path, dtype=jnp.bfloat16)
  jax.block_until_ready(jax.tree.leaves(model))
  dt = time.perf_counter() - t0
  print(f"{base} {_peak_rss()} {dt}")


def bench_memory():
  with tempfile.TemporaryDirectory() as d:
    n = _write_big_checkpoint(d)
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    disk = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    out = subprocess.run(
        [sys.executable, __file__, "--_load", d],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    base, peak, dt = int(out[-3]), int(out[-2]), float(out[-1])
  gib = 1024**3
  print(
      f"loading a {n / 1e9:.2f}B-parameter bfloat16 checkpoint in"
      f" {len(files)} shards ({disk / gib:.2f} GiB on disk), {dt:.1f} s"
  )
  print(f"  peak RSS: {peak / gib:.2f} GiB (process baseline {base / gib:.2f})")
  print(
      f"  peak RSS above baseline / size on disk: {(peak - base) / disk:.2f}x"
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip_memory", action="store_true")
  parser.add_argument("--skip_speed", action="store_true")
  parser.add_argument("--family", default="qwen2_5_vl,qwen3_vl")
  parser.add_argument("--_load", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._load:  # pylint: disable=protected-access
    _load_and_report(args._load)  # pylint: disable=protected-access
    return
  if not args.skip_speed:
    for family in args.family.split(","):
      bench_speed(args.repeats, family)
  if not args.skip_memory:
    bench_memory()


if __name__ == "__main__":
  main()
