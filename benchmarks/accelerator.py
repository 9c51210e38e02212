r"""Throughput, MFU and bf16 numerics of the 3B recipe on one GPU or TPU.

  python benchmarks/accelerator.py                      # qwen2_5_vl_3b
  python benchmarks/accelerator.py --rows=8 --attention=flash
  python benchmarks/accelerator.py --tiny               # CPU dry run

On one device, from random weights (float32 masters, bf16 compute, the
recipe's remat), at the recipe's shapes (a 2,048-token prompt bucket with
an image of up to 1,280 visual tokens, `--rows` sampled responses of 1,024
tokens sharing it), prints:

* update: tokens/s of one RL update step (EASE recipe: the shared-prefix
  forward with the attention probe, DAPO + EASE loss, gradients, AdamW)
  and its MFU. Model FLOPs: 6 x trained decoder parameters x tokens, plus
  attention (12 x layers x heads x head_dim x visible keys per token, the
  forward's 4 and the backward's 8), plus 2 x vision parameters x patches
  (the frozen tower's forward); tokens = prompt tokens + response tokens.
  Against the chip's dense bf16 peak (`--peak_tflops`, else a table).
* old_logp: the same batch's no-gradient log-prob pass, which the real
  recipes run once per step (`rl.old_logp='recompute'`), and its share of
  the update step's time.
* decode: tokens/s of greedy sampling at `--decode_batch` (64) sequences,
  net of the prefill, and its share of the HBM-bandwidth roofline: one
  step must read the weights (in the dtype the sampler holds them) and
  every sequence's keys and values once.
* kernels: the backend's attention kernel (cuDNN on GPU, splash on TPU)
  against the portable blocked `flash` at a prompt prefill: max |diff| and
  milliseconds each.
* numerics: the sampler's log-probs of its own tokens against the training
  forward's (both bf16 on this device): they should agree to float
  rounding, since both are one model with float32 logits; and against a
  float32 forward, the size of bf16 itself.

With `--profile=N`, the update and decode sections also trace one more
call with `jax.profiler` and print their N most expensive XLA ops (the
device's kernels on a GPU or TPU; XLA's thunks on a CPU), each with its
share of all op time: where a step's time goes, from the same run.

Print once, then paste the figures into the README with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

# Dense bf16 peak TFLOP/s and HBM GB/s per chip (vendor data sheets).
CHIPS = {
    "H100": (989.0, 3350.0),
    "H200": (989.0, 4800.0),
    "A100": (312.0, 2039.0),
    "TPU v4": (275.0, 1200.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5e": (197.0, 819.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v6 lite": (918.0, 1640.0),
    "TPU v6e": (918.0, 1640.0),
}


def chip_specs(device_kind: str):
  for name, spec in CHIPS.items():
    if name.lower() in device_kind.lower():
      return spec
  return None


def _timeit(fn, repeats: int) -> float:
  """Median seconds of `fn()` after one warm-up call."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


# Host-side events of XLA:CPU's runtime that wrap or wait on the ops.
_CPU_RUNTIME_EVENTS = ("ThunkExecutor", "Slinky", "Threadpool", "end:")
# Ops whose events contain their bodies' ops: counted through those.
_CONTAINER_OPS = ("while", "conditional", "call")


def op_times(trace_dir: str) -> dict[str, float]:
  """Seconds per XLA op in the newest `jax.profiler` trace under
  `trace_dir`, summed over its calls.

  On a GPU or TPU, the device planes' "XLA Ops" line (or, where the
  profiler writes none, every kernel on the device's lines); on a CPU, the
  XLA ops run by the host's XLA threads. Loops and calls are left out:
  their events span their bodies' ops, which are counted.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  files = glob.glob(
      os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True
  )
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  devices = [p for p in data.planes if p.name.startswith("/device:")]
  lines = []
  for plane in devices:
    plane_lines = list(plane.lines)
    ops = [l for l in plane_lines if l.name == "XLA Ops"]
    lines += ops or [l for l in plane_lines if l.name != "XLA Modules"]
  if not devices:
    lines = [
        l for p in data.planes for l in p.lines if l.name.startswith("tf_XLA")
    ]
  times = collections.Counter()
  for line in lines:
    for ev in line.events:
      if ev.name.startswith(_CPU_RUNTIME_EVENTS):
        continue
      if ev.name.split(".")[0] in _CONTAINER_OPS:
        continue
      # The JAX op an XLA op came from, where the profiler records it.
      source = dict(ev.stats).get("tf_op")
      times[f"{ev.name} ({source})" if source else ev.name] += (
          ev.duration_ns * 1e-9
      )
  return dict(times)


def top_ops(fn, n: int) -> list[tuple[str, float, float]]:
  """[(op, seconds, share of all op time)] of the n most expensive ops of
  one traced call of `fn` (warm: compiled already)."""
  import tempfile  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(fn())
    times = op_times(d)
  total = sum(times.values())
  ranked = sorted(times.items(), key=lambda kv: -kv[1])[:n]
  return [(name, sec, sec / total) for name, sec in ranked]


def _print_top_ops(ops) -> None:
  for name, sec, share in ops:
    print(f"    {100 * share:5.1f}%  {sec * 1e3:9.2f} ms  {name}")


def _setup_model(args):
  """(config, model_config, graphdef, params) at the recipe's options."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import qwen2_5_vl_ease  # pylint: disable=g-import-not-at-top
  from faithful_rl import models  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top

  if args.tiny:
    config = qwen2_5_vl_ease.get_config("demo")
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
  else:
    config = qwen2_5_vl_ease.get_config(f"variant={args.variant}")
  if args.attention:
    config.model.attention = args.attention
  model_config = train.model_config_for(config)
  options = train.model_options(config)
  graphdef, state = nnx.split(
      models.create(
          model_config, dtype=jnp.dtype(config.model.dtype), seed=0, **options
      )
  )
  params = jax.device_put(nnx.to_pure_dict(state), jax.devices()[0])
  return config, model_config, graphdef, params


def shapes(args, config, model_config):
  """(prompt tokens, visual tokens, patch slots, response tokens)."""
  if args.tiny:  # one 4 x 4-token image, in whatever slots its layout takes
    from faithful_rl.models import inputs as inputs_lib  # pylint: disable=g-import-not-at-top

    m = model_config.vision.spatial_merge_size
    slots = inputs_lib.layout_patches([(1, 4 * m, 4 * m)], model_config.vision)
    return 48, 16, slots, 16
  vis = 1280
  patches = config.data.patch_buckets[-1]
  return config.data.prompt_buckets[-1], vis, patches, 1024


def make_batch(model_config, *, prompts, rows_per_prompt, prompt_len, visual,
               patches, response_len, seed=0):  # fmt: skip
  """A random RL batch: left-padded prompts each with one image of `visual`
  tokens laid out in a near-square grid, responses of full length."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from faithful_rl import rl  # pylint: disable=g-import-not-at-top
  from faithful_rl.models import inputs as inputs_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  vcfg = model_config.vision
  m = vcfg.spatial_merge_size
  gh = int(np.sqrt(visual))
  while visual % gh:
    gh -= 1
  grid = (1, gh * m, (visual // gh) * m)
  n_img = visual
  text = prompt_len - n_img - 2
  prompt = (
      list(rng.integers(3, 100, text // 2))
      + [model_config.vision_start_token_id]
      + [model_config.image_token_id] * n_img
      + [model_config.vision_end_token_id]
      + list(rng.integers(3, 100, text - text // 2))
  )
  ids = np.array([prompt] * prompts, np.int32)
  mask = np.ones_like(ids, bool)
  grids = [[grid]] * prompts
  pos, _ = inputs_lib.rope_index(ids, mask, grids, model_config)
  pix = [
      rng.standard_normal((grid[1] * grid[2], vcfg.patch_dim), np.float32)
  ] * prompts
  vis = inputs_lib.vision_inputs(pix, grids, patches, vcfg)
  n = prompts * rows_per_prompt
  v = patches // vcfg.merge_unit
  target = np.zeros((prompts, v), np.float32)
  target[:, :n_img] = 1.0 / n_img
  f32 = lambda *shape: np.zeros(shape, np.float32)
  batch = rl.RolloutBatch(
      prompt_ids=ids,
      prompt_mask=mask,
      position_ids=np.swapaxes(pos, 0, 1),
      vision=vis,
      cf_vision=None,
      ease_target=target,
      evidence_mask=target > 0,
      has_boxes=np.ones(prompts, bool),
      group_ids=np.arange(prompts, dtype=np.int32),
      tokens=rng.integers(3, 100, (n, response_len)).astype(np.int32),
      mask=np.ones((n, response_len), bool),
      old_logp=f32(n, response_len) - 2.0,
      ref_logp=None,
      token_weights=f32(n, response_len) + 1.0,
      advantages=rng.standard_normal(n).astype(np.float32),
      rewards=f32(n) + 1.0,
      correct=f32(n) + 1.0,
      correct_cf=None,
      truncated=np.zeros(n, bool),
      row_ids=np.arange(n, dtype=np.int32),
  )
  return jax.tree.map(jnp.asarray, batch)


def model_flops(model_config, params, *, prompt_len, patches, rows,
                response_len) -> float:  # fmt: skip
  """Model FLOPs of one update step (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top

  t = model_config.text
  n_vision = sum(x.size for x in jax.tree.leaves(params["visual"]))
  n_text = sum(x.size for x in jax.tree.leaves(params)) - n_vision
  tokens = prompt_len + rows * response_len
  dense = 6.0 * n_text * tokens
  # Visible keys: a prompt token sees half the prompt on average; a
  # response token the whole prompt and half of its response.
  keys = prompt_len * prompt_len / 2 + rows * response_len * (
      prompt_len + response_len / 2
  )
  attn = 12.0 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * keys
  vision = 2.0 * n_vision * patches
  return dense + attn + vision, tokens


def update_batch(args, config, model_config):
  """((prompt, visual, patch slots, response) lengths, the update's batch of
  one prompt and `--rows` responses, its `RLConfig`)."""
  from faithful_rl import steps  # pylint: disable=g-import-not-at-top

  lengths = shapes(args, config, model_config)
  tp, vis, patches, r = lengths
  batch = make_batch(
      model_config, prompts=1, rows_per_prompt=args.rows, prompt_len=tp,
      visual=vis, patches=patches, response_len=r,
  )  # fmt: skip
  config.rl.num_samples = args.rows
  return lengths, batch, steps.RLConfig.from_config(config.rl)


def bench_update(args, config, model_config, graphdef, params):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from faithful_rl import optim  # pylint: disable=g-import-not-at-top
  from faithful_rl import steps  # pylint: disable=g-import-not-at-top
  from faithful_rl import train  # pylint: disable=g-import-not-at-top
  from faithful_rl.rl import loss as rl_loss  # pylint: disable=g-import-not-at-top

  (tp, vis, patches, r), batch, cfg = update_batch(args, config, model_config)
  rc = config.rl
  tx = train.make_tx(config, "rl", params, 100)
  own = jax.tree.map(jnp.copy, params)  # the update donates its state
  state = steps.TrainState(own, tx.init(own), jnp.zeros((), jnp.int32))
  update = steps.make_update(
      rl_loss.RL, tx, graphdef, cfg, frozen=optim.frozen_patterns(rc.optim)
  )
  micro = jax.tree.map(lambda x: x[None], batch)  # one micro-batch
  rng = jax.random.key(0)
  holder = [state]

  def step():
    holder[0], m = update(holder[0], micro, rng)
    return m["loss"]

  t0 = time.perf_counter()
  jax.block_until_ready(step())
  compile_s = time.perf_counter() - t0
  sec = _timeit(step, args.repeats)
  ops = top_ops(step, args.profile) if args.profile else []
  flops, tokens = model_flops(
      model_config, params, prompt_len=tp, patches=patches, rows=args.rows,
      response_len=r,
  )  # fmt: skip
  return dict(
      seconds=sec,
      tokens=tokens,
      tokens_per_sec=tokens / sec,
      tflops=flops / sec / 1e12,
      compile_s=compile_s,
      shape=f"1 prompt ({tp} tok, {vis} visual) x {args.rows} responses of {r}",
      top_ops=ops,
  )


def bench_old_logp(args, config, model_config, graphdef, params):
  """The learner's no-gradient log-prob pass (`rl.old_logp='recompute'`,
  the real recipes' setting) over the update's batch, in one chunk."""
  import jax  # pylint: disable=g-import-not-at-top

  from faithful_rl.rl import analysis  # pylint: disable=g-import-not-at-top

  (tp, _, _, r), batch, cfg = update_batch(args, config, model_config)
  chunks = jax.tree.map(lambda x: x[None], batch)
  fn = jax.jit(analysis.reference_chunks, static_argnums=(1, 3))
  sec = _timeit(lambda: fn(params, graphdef, chunks, cfg), args.repeats)
  tokens = tp + args.rows * r
  return dict(seconds=sec, tokens=tokens, tokens_per_sec=tokens / sec)


def bench_decode(args, config, model_config, graphdef, params):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl import rollout  # pylint: disable=g-import-not-at-top

  tp, vis, patches, r = shapes(args, config, model_config)
  r = args.decode_tokens or r
  g = args.decode_group
  prompts = max(args.decode_batch // g, 1)
  batch = make_batch(
      model_config, prompts=prompts, rows_per_prompt=g, prompt_len=tp,
      visual=vis, patches=patches, response_len=1,
  )  # fmt: skip
  batch = batch.prompt_inputs()
  dtype = jnp.dtype(config.model.dtype)
  # The float32 masters, as the trainer samples: the rollout program casts
  # them to the compute dtype once, so a step reads 2 bytes per parameter.
  model = nnx.merge(graphdef, params)

  def sample(n):
    cfg = rollout.SamplingConfig(
        num_samples=g, max_new_tokens=n, greedy=True, stop_tokens=()
    )
    return rollout.sample(model, batch, jax.random.key(0), cfg).tokens

  full = _timeit(lambda: sample(r), args.repeats)
  one = _timeit(lambda: sample(1), args.repeats)
  ops = top_ops(lambda: sample(r), args.profile) if args.profile else []
  n_seq = prompts * g
  per_step = (full - one) / max(r - 1, 1)
  t = model_config.text
  n_params = sum(x.size for x in jax.tree.leaves(params))
  kv_bytes = lambda slots: (
      2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * slots
      * dtype.itemsize
  )  # fmt: skip
  # One decoding step halfway through: weights, each prompt's keys once
  # (shared by its G rows), each row's own keys so far.
  step_bytes = (
      n_params * dtype.itemsize
      + prompts * kv_bytes(tp)
      + n_seq * kv_bytes(r / 2)
  )
  return dict(
      tokens_per_sec=n_seq / per_step,
      step_ms=per_step * 1e3,
      step_bytes=step_bytes,
      shape=(
          f"{n_seq} sequences ({prompts} prompts x {g}), {tp}-token"
          f" prompts, {r} new tokens"
      ),
      top_ops=ops,
  )


def bench_numerics(args, config, model_config, graphdef, params):
  """Sampler vs training-forward log-probs of the sampled tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from faithful_rl import forward  # pylint: disable=g-import-not-at-top
  from faithful_rl import rollout  # pylint: disable=g-import-not-at-top

  tp, vis, patches, _ = shapes(args, config, model_config)
  r, g = 64, 4
  batch = make_batch(
      model_config, prompts=2, rows_per_prompt=g, prompt_len=tp, visual=vis,
      patches=patches, response_len=1,
  )  # fmt: skip
  batch = batch.prompt_inputs()
  model = nnx.merge(graphdef, params)
  cfg = rollout.SamplingConfig(num_samples=g, max_new_tokens=r, stop_tokens=())
  out = rollout.sample(model, batch, jax.random.key(1), cfg)

  def score(m):
    # The weights are an argument of the jitted function: closed over,
    # they would be baked into the program as constants (15 GB at 3B).
    gdef, state = nnx.split(m)

    @jax.jit
    def fn(state, batch, toks, mask):
      return forward.score(
          nnx.merge(gdef, state), batch, toks, mask, num_samples=g
      )[0]

    return fn(state, batch, out.tokens, out.mask)

  lp_train = score(model)
  from faithful_rl import models  # pylint: disable=g-import-not-at-top

  model32 = nnx.merge(
      nnx.split(
          models.create(
              model_config,
              dtype=jnp.float32,
              param_dtype=jnp.float32,
              attention=model.attention,
          )
      )[0],
      params,
  )
  lp_32 = score(model32)
  m = np.asarray(out.mask)
  d_train = np.abs(np.asarray(out.logprobs) - np.asarray(lp_train))[m]
  d_32 = np.abs(np.asarray(out.logprobs) - np.asarray(lp_32))[m]
  return dict(
      tokens=int(m.sum()),
      vs_train_max=float(d_train.max()),
      vs_train_mean=float(d_train.mean()),
      vs_f32_max=float(d_32.max()),
      vs_f32_mean=float(d_32.mean()),
  )


def bench_kernels(args, config, model_config):
  """The backend's attention kernel ('auto') against the portable `flash`
  at the recipe's prompt prefill: equal outputs, and each one's time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import attention  # pylint: disable=g-import-not-at-top

  t = model_config.text
  tp = shapes(args, config, model_config)[0]
  dtype = jnp.dtype(config.model.dtype)
  rng = np.random.default_rng(0)
  q = jnp.asarray(
      rng.standard_normal((1, tp, t.num_attention_heads, t.head_dim)), dtype
  )
  kv_shape = (1, t.num_key_value_heads, tp, t.head_dim)
  k = jnp.asarray(rng.standard_normal(kv_shape), dtype)
  v = jnp.asarray(rng.standard_normal(kv_shape), dtype)
  pad = tp // 8  # a left-padded prompt
  seg = jnp.asarray((np.arange(tp) >= pad)[None], jnp.int32)
  slots = jnp.arange(tp, dtype=jnp.int32)[None]
  mask = dict(q_seg=seg, kv_seg=seg, q_pos=slots, kv_pos=slots)
  native = attention.resolve("auto")

  def run(impl):
    fn = jax.jit(
        lambda q, k, v: attention.attend(
            q, k, v, **mask, scale=t.head_dim**-0.5, impl=impl,
            causal_offset=0,
        )
    )  # fmt: skip
    out = fn(q, k, v)
    return out, _timeit(lambda: fn(q, k, v), args.repeats)

  out_n, sec_n = run(native)
  out_f, sec_f = run("flash")
  diff = float(
      jnp.abs(out_n.astype(jnp.float32) - out_f.astype(jnp.float32))[
          :, pad:
      ].max()
  )
  return dict(native=native, diff=diff, native_ms=sec_n * 1e3,
              flash_ms=sec_f * 1e3, tokens=tp)  # fmt: skip


def _report_update(args, config, model_config, graphdef, params, *, peak, hbm,
                   done):  # fmt: skip
  del hbm, done
  u = bench_update(args, config, model_config, graphdef, params)
  mfu = u["tflops"] / peak if peak else float("nan")
  print(
      f"update  {u['shape']}: {u['seconds'] * 1e3:.0f} ms,"
      f" {u['tokens_per_sec']:.0f} tokens/s, {u['tflops']:.1f} TFLOP/s,"
      f" MFU {100 * mfu:.1f}% (compile {u['compile_s']:.0f} s)"
  )
  _print_top_ops(u["top_ops"])
  return dict(u, mfu=mfu)


def _report_old_logp(args, config, model_config, graphdef, params, *, peak,
                     hbm, done):  # fmt: skip
  del peak, hbm
  o = bench_old_logp(args, config, model_config, graphdef, params)
  update = done.get("update")
  share = o["seconds"] / update["seconds"] if update else float("nan")
  print(
      "old-log-prob pass (rl.old_logp=recompute), same batch:"
      f" {o['seconds'] * 1e3:.0f} ms, {o['tokens_per_sec']:.0f} tokens/s,"
      f" {100 * share:.0f}% of the update step"
  )
  return dict(o, share_of_update=share)


def _report_decode(args, config, model_config, graphdef, params, *, peak, hbm,
                   done):  # fmt: skip
  del peak, done
  d = bench_decode(args, config, model_config, graphdef, params)
  roof = d["step_bytes"] / (hbm * 1e9) if hbm else float("nan")
  share = roof / (d["step_ms"] / 1e3) if hbm else float("nan")
  print(
      f"decode  {d['shape']}: {d['tokens_per_sec']:.0f} tokens/s,"
      f" {d['step_ms']:.2f} ms/step; roofline {roof * 1e3:.2f} ms/step"
      f" ({d['step_bytes'] / 1e9:.2f} GB read), {100 * share:.0f}% of it"
  )
  _print_top_ops(d["top_ops"])
  return dict(d, roofline_share=share)


def _report_kernels(args, config, model_config, graphdef, params, *, peak,
                    hbm, done):  # fmt: skip
  del graphdef, params, peak, hbm, done
  k = bench_kernels(args, config, model_config)
  print(
      f"attention prefill ({k['tokens']} tokens): {k['native']}"
      f" {k['native_ms']:.2f} ms vs flash {k['flash_ms']:.2f} ms, max"
      f" |diff| {k['diff']:.2e}"
  )
  return k


def _report_numerics(args, config, model_config, graphdef, params, *, peak,
                     hbm, done):  # fmt: skip
  del peak, hbm, done
  n = bench_numerics(args, config, model_config, graphdef, params)
  print(
      f"log-probs of {n['tokens']} sampled tokens: sampler vs training"
      f" forward (bf16) max {n['vs_train_max']:.2e} mean"
      f" {n['vs_train_mean']:.2e}; vs a float32 forward max"
      f" {n['vs_f32_max']:.2e} mean {n['vs_f32_mean']:.2e}"
  )
  return n


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="3b")
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--decode_batch", type=int, default=64)
  parser.add_argument("--decode_group", type=int, default=16)
  parser.add_argument("--decode_tokens", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--attention", default="")
  parser.add_argument("--peak_tflops", type=float, default=0.0)
  parser.add_argument("--hbm_gbps", type=float, default=0.0)
  parser.add_argument(
      "--tiny", action="store_true", help="the demo's model: a CPU dry run"
  )
  parser.add_argument(
      "--skip",
      default="",
      help="any of update,old_logp,decode,kernels,numerics",
  )
  parser.add_argument(
      "--out", default="", help="also write the figures to this JSON file"
  )
  parser.add_argument(
      "--profile",
      type=int,
      default=0,
      help="print the update's and decode's N most expensive XLA ops",
  )
  args = parser.parse_args(argv)
  if args.tiny:
    args.rows, args.decode_batch, args.decode_group = 4, 8, 4
    # 63 decoding steps: enough that their time stands out of CPU noise.
    args.decode_tokens = args.decode_tokens or 64

  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  spec = chip_specs(device.device_kind)
  peak = args.peak_tflops or (spec[0] if spec else 0.0)
  hbm = args.hbm_gbps or (spec[1] if spec else 0.0)
  config, model_config, graphdef, params = _setup_model(args)
  print(
      f"device: {device.device_kind} ({device.platform}); peak"
      f" {peak or '?'} TFLOP/s bf16, HBM {hbm or '?'} GB/s;"
      f" attention={config.model.attention}, remat={config.model.remat}"
  )
  results, failed = {}, []
  skip = set(args.skip.split(","))
  for name, section in (
      ("update", _report_update),
      ("old_logp", _report_old_logp),
      ("decode", _report_decode),
      ("kernels", _report_kernels),
      ("numerics", _report_numerics),
  ):
    if name in skip:
      continue
    # One section failing (a kernel this backend lacks, memory) must not
    # cost the others' figures on a machine that is lent by the minute.
    try:
      # `done`: the figures so far (the old-log-prob pass reads the update's).
      results[name] = section(args, config, model_config, graphdef, params,
                              peak=peak, hbm=hbm, done=results)  # fmt: skip
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      print(f"{name}: FAILED (traceback above)")
      failed.append(name)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(dict(device=device.device_kind, results=results,
                       failed=failed), f, indent=1)  # fmt: skip
  if failed:
    raise SystemExit(f"sections failed: {', '.join(failed)}")
  return results


if __name__ == "__main__":
  main()
