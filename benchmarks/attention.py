r"""CPU attention: what `attend(impl='auto')` picks, against the alternatives.

  python benchmarks/attention.py
  python benchmarks/attention.py --repeats=15

At the attention shapes of the forward benchmark's models (float32, 8
heads of 64, two images of 448 x 448 px, so 1,024 patches each): the
vision tower's window attention (32 windows of 64 patches per image), its
full attention (1,024 patches per image), and causal decoder attention over
308 and 2,048 tokens. Times `xla` (one softmax over the [T, S] scores),
`flash` in `attention.CPU_FLASH_BLOCKS` and `auto`, plus torch's
`scaled_dot_product_attention` with the same thread count as a reference
(torch's is a hand-written fused kernel; ours are XLA programs). The runs
alternate, with a pause between calls (torch's OpenMP threads spin for
milliseconds after each call and would slow the next one); prints medians
and each one's ratio to `auto`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import timing


def shapes():
  """(name, q [B, T, H, d] shape, k/v [B, K, S, d] shape, causal)."""
  h, d = 8, 64
  return [
      ("vision windows 64 x 64 patches", (64, 64, h, d), (64, h, 64, d), False),
      ("vision full 2 x 1024 patches", (2, 1024, h, d), (2, h, 1024, d), False),
      ("decoder causal 2x308 (GQA 8/2)", (2, 308, h, d), (2, 2, 308, d), True),
      (
          "decoder causal 1x2048 (GQA 8/2)",
          (1, 2048, h, d),
          (1, 2, 2048, d),
          True,
      ),
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch

  from faithful_rl.models import attention

  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  print(
      f"float32, {os.cpu_count()} CPU threads; flash blocks (q, k) ="
      f" {attention.CPU_FLASH_BLOCKS}, 'auto' uses flash from"
      f" {attention.CPU_FLASH_MIN_KEYS} keys"
  )
  for name, qs, ks, causal in shapes():
    q = rng.standard_normal(qs, np.float32)
    k = rng.standard_normal(ks, np.float32)
    v = rng.standard_normal(ks, np.float32)
    b, t, s = qs[0], qs[1], ks[2]
    seg = dict(
        q_seg=jnp.ones((b, t), jnp.int32), kv_seg=jnp.ones((b, s), jnp.int32)
    )
    if causal:
      seg.update(
          q_pos=jnp.broadcast_to(jnp.arange(t), (b, t)),
          kv_pos=jnp.broadcast_to(jnp.arange(s), (b, s)),
          causal_offset=0,
      )
    blocks = dict(zip(("block_q", "block_k"), attention.CPU_FLASH_BLOCKS))
    d_scale = qs[-1] ** -0.5
    fns = {
        "auto": lambda q, k, v: attention.attend(
            q, k, v, scale=d_scale, impl="auto", **seg
        ),
        "xla": lambda q, k, v: attention.attend(
            q, k, v, scale=d_scale, impl="xla", **seg
        ),
        "flash": lambda q, k, v: attention.flash_attention(
            q, k, v, seg["q_seg"], seg["kv_seg"], seg.get("q_pos"),
            seg.get("kv_pos"), scale=d_scale, **blocks,
        ),  # fmt: skip
    }
    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    jitted = {n: jax.jit(f) for n, f in fns.items()}
    ref = np.asarray(jitted["xla"](jq, jk, jv))
    for n, f in jitted.items():
      err = float(np.abs(np.asarray(f(jq, jk, jv)) - ref).max())
      assert err < 1e-4, (name, n, err)
    tq = torch.tensor(q).transpose(1, 2)
    tk, tv = torch.tensor(k), torch.tensor(v)
    if ks[1] != qs[2]:  # grouped: repeat the kv heads for torch
      tk = tk.repeat_interleave(qs[2] // ks[1], dim=1)
      tv = tv.repeat_interleave(qs[2] // ks[1], dim=1)

    def torch_sdpa():
      with torch.no_grad():
        return torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, is_causal=causal
        )

    calls = {n: (lambda f=f: f(jq, jk, jv).block_until_ready())
             for n, f in jitted.items()}  # fmt: skip
    calls["torch sdpa"] = torch_sdpa
    for c in calls.values():
      c()  # compile / warm up
    med = timing.alternate(list(calls.values()), args.repeats)
    med = {n: m * 1e3 for n, m in zip(calls, med)}
    row = ", ".join(
        f"{n} {m:.2f} ms ({m / med['auto']:.2f}x auto)" for n, m in med.items()
    )
    print(f"{name}: {row}")


if __name__ == "__main__":
  main()
