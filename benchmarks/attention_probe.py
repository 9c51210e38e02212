r"""The fused attention-supervision term vs a naive full-attention version.

  python benchmarks/attention_probe.py

For one decoder layer (16 heads of 128 with 4 kv heads), a batch
of 2 sequences of T tokens with 256 visual tokens (one 448-px image) and K = 64 supervised
response rows, both versions compute the EASE loss and its gradient with
respect to q and k:
  fused: `probe_attention`, the [B, H, K, T] slice from q and k;
  naive: the full [B, H, T, T] softmax, then the same slice.
Prints the peak temporary memory XLA plans for each compiled program
(`memory_analysis`, exact for the program, independent of the allocator)
and the median wall time, and their ratios, for T = 1024 and 4096.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from faithful_rl import losses
from faithful_rl.models.qwen2_5_vl import AttentionProbe
from faithful_rl.models.qwen2_5_vl import probe_attention

HEADS, KV_HEADS, HEAD_DIM, VISUAL, K = (
    16,
    4,
    128,
    256,
    64,
)  # 256: one 448-px image


def _setup(t: int, batch: int):
  rng = np.random.default_rng(0)
  # Moderate logits (std ~1), as in a trained layer; unit-variance q and k
  # would give logits of std ~11 and probabilities underflowing to 0.
  q = jnp.asarray(
      0.3 * rng.standard_normal((batch, t, HEADS, HEAD_DIM)), jnp.float32
  )
  k = jnp.asarray(
      0.3 * rng.standard_normal((batch, t, KV_HEADS, HEAD_DIM)), jnp.float32
  )
  start = 16
  kpos = jnp.broadcast_to(
      jnp.arange(start, start + VISUAL)[None], (batch, VISUAL)
  )
  resp = t - 128  # response tokens at the end
  qpos = jnp.broadcast_to(
      jnp.sort(jnp.asarray(rng.choice(np.arange(resp, t), K, replace=False)))[
          None
      ],
      (batch, K),
  )
  probe = AttentionProbe(
      query_positions=qpos.astype(jnp.int32),
      key_positions=kpos.astype(jnp.int32),
      key_valid=jnp.ones((batch, VISUAL), bool),
      layers=(0,),
  )
  target = jax.nn.softmax(
      jnp.asarray(rng.standard_normal((batch, VISUAL)), jnp.float32)
  )
  key_mask = jnp.ones((batch, t), bool)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (batch, t))
  return q, k, key_mask, slots, probe, target


def _loss(rows, probe, target):
  attn = rows.mean(1)  # heads averaged: [B, K, V]
  kl = losses.attention_kl(attention=attn, target=target, valid=probe.key_valid)
  return kl.mean()


def fused(q, k, key_mask, slots, probe, target):
  rows = probe_attention(q, k, key_mask, slots, probe, HEAD_DIM**-0.5)
  return _loss(rows, probe, target)


def naive(q, k, key_mask, slots, probe, target):
  b, t, h, d = q.shape
  kk = jnp.repeat(k, h // k.shape[2], axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, kk) * HEAD_DIM**-0.5
  causal = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(causal & key_mask[:, None, None, :], logits, -1e30)
  full = jax.nn.softmax(logits, axis=-1)  # [B, H, T, T]
  rows = jnp.take_along_axis(
      full, probe.query_positions[:, None, :, None], axis=2
  )
  rows = jnp.take_along_axis(rows, probe.key_positions[:, None, None, :], 3)
  return _loss(rows, probe, target)


def measure(fn, args, repeats):
  grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  compiled = grad.lower(*args).compile()
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return peak, float(np.median(times)), compiled(*args)[0]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="1024,4096")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(
      f"EASE term + grad wrt q, k: batch {args.batch}, {HEADS} heads x"
      f" {HEAD_DIM} (kv heads {KV_HEADS}), {VISUAL} visual tokens, K={K}"
      f" rows, float32, {jax.default_backend()}"
  )
  print(
      f"{'T':>6} {'fused MiB':>10} {'naive MiB':>10} {'mem ratio':>9}"
      f" {'fused ms':>9} {'naive ms':>9} {'time ratio':>10}"
  )
  for t in (int(x) for x in args.lengths.split(",")):
    inputs = _setup(t, args.batch)
    mf, tf, lf = measure(fused, inputs, args.repeats)
    mn, tn, ln = measure(naive, inputs, args.repeats)
    assert abs(float(lf) - float(ln)) < 1e-4 * max(1.0, abs(float(ln)))
    mib = 1024**2
    print(
        f"{t:6d} {mf / mib:10.1f} {mn / mib:10.1f} {mn / mf:8.1f}x"
        f" {tf * 1e3:9.1f} {tn * 1e3:9.1f} {tn / tf:9.1f}x"
    )


if __name__ == "__main__":
  main()
