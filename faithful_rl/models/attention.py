"""Attention kernels: one masking convention, several implementations.

The mask of every attention in the models is given by vectors, never by a
[B, T, S] tensor: query i may attend key j iff

    q_seg[b, i] == kv_seg[b, j]   and   (not causal or kv_pos[b, j] <= q_pos[b, i])

Segment ids express padding (decoder: 1 real, 0 padding) and images
(vision: image id per patch, -1 padding); positions express causality with
any offset (a KV cache, a shared prompt prefix).

Attention over two key sets (a prompt shared by G sampled responses, then
each response's own tokens) runs as two products merged by their
log-sum-exp (`merge`), so the shared keys are never repeated G times.

Implementations:
  xla    masked softmax over the whole [B, H, T, S] score tensor,
         normalised after the value product. The fastest on CPU up to
         about a thousand keys.
  flash  blocked online softmax in plain JAX with a recomputing backward
         (FlashAttention-2's algorithm): memory O(T * block) instead of
         O(T * S), on any backend. `benchmarks/memory.py` compiles it to
         account for the fused kernels' memory on CPU.
  splash the Pallas TPU kernel (segment ids and a static causal offset);
         attention that needs the log-sum-exp (a shared prefix) or
         positions without a static offset falls back to `flash`. Tests
         run it in the Pallas interpreter on CPU.
  cudnn  the GPU's fused kernel (`jax.nn.dot_product_attention`) for causal
         self-attention over contiguous real tokens in bf16/fp16 (prompt
         prefills, full-sequence forwards); the rest falls back to `flash`.
         Tests run the same call through XLA on CPU;
         `benchmarks/accelerator.py` compares it with `flash` on a GPU.

'auto' picks splash on TPU, cudnn on GPU, and on CPU xla for up to
`CPU_FLASH_MIN_KEYS` keys and flash in `CPU_FLASH_BLOCKS` above: there the
blocked form's tiles stay in cache (`benchmarks/attention.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # a masked logit: exp(NEG - m) == 0 for any real row maximum m
CPU_FLASH_MIN_KEYS = 1024  # 'auto' on CPU: flash from this many keys on
CPU_FLASH_BLOCKS = (128, 1024)  # its (query, key) blocks there


def _group(q, kh):
  """[B, T, H, d] -> [B, K, G, T, d]."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)


def _ungroup(x):
  """[B, K, G, T, d] -> [B, T, H, d]."""
  b, kh, g, t, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, d)


def _mask(q_seg, kv_seg, q_pos, kv_pos):
  """bool[B, T, S] (only ever formed blockwise or fused into a select)."""
  m = q_seg[:, :, None] == kv_seg[:, None, :]
  if q_pos is not None:
    m &= kv_pos[:, None, :] <= q_pos[:, :, None]
  return m


def xla_attention(
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, scale, return_lse=False
):
  """Reference masked softmax; k, v: [B, K, S, d] (heads first).

  With `return_lse` also returns the float32 log-sum-exp of each query's
  scaled logits, [B, T, H] (differentiable).
  """
  b, t, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = h // kh
  qg = _group(q, kh).reshape(b, kh, g * t, d)
  logits = jnp.einsum(
      "bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32
  ).reshape(b, kh, g, t, s)
  mask = _mask(q_seg, kv_seg, q_pos, kv_pos)
  logits = jnp.where(mask[:, None, None], logits * scale, NEG)
  # Softmax with the division after the value product: one pass over the
  # [T, S] weights fewer, and [T, d] divisions in place of [T, S].
  m = jax.lax.stop_gradient(logits.max(-1))
  p = jnp.exp(logits - m[..., None])
  l = p.sum(-1)
  out = jnp.einsum(
      "bkqs,bksd->bkqd",
      p.astype(v.dtype).reshape(b, kh, g * t, s),
      v,
      preferred_element_type=jnp.float32,
  ).reshape(b, kh, g, t, d)
  out = _ungroup((out / l[..., None]).astype(v.dtype))
  if not return_lse:
    return out
  lse = m + jnp.log(l)  # [B, K, G, T]
  return out, lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def merge(parts):
  """Attention over the union of disjoint key sets from per-set results.

  Args:
    parts: [(out [B, T, H, d], lse float32[B, T, H])], each the attention of
      the same queries over one key set.

  Returns:
    [B, T, H, d]: what one softmax over all the keys would give.
  """
  lse = jnp.stack([p[1] for p in parts])  # [n, B, T, H]
  total = jax.nn.logsumexp(lse, axis=0)
  out = sum(
      o.astype(jnp.float32) * jnp.exp(l - total)[..., None] for o, l in parts
  )
  return out.astype(parts[0][0].dtype)


# ---------------------------------------------------------------------------
# flash: blocked, with a recomputing backward.
# ---------------------------------------------------------------------------


def _pad_to(x, axis, n, value):
  extra = n - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def flash_attention(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    q_pos,
    kv_pos,
    *,
    scale,
    block_q=512,
    block_k=512,
    return_lse=False,
):
  """Blocked attention; same contract as `xla_attention`."""
  b, t, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  causal = q_pos is not None
  if not causal:
    q_pos = jnp.zeros(q_seg.shape, jnp.int32)
    kv_pos = jnp.zeros(kv_seg.shape, jnp.int32)
  # Padded queries and keys never match a real segment (and not each other).
  qg = _pad_to(_group(q, kh), 3, tp, 0)
  k, v = _pad_to(k, 2, sp, 0), _pad_to(v, 2, sp, 0)
  q_seg = _pad_to(q_seg.astype(jnp.int32), 1, tp, -(2**30))
  kv_seg = _pad_to(kv_seg.astype(jnp.int32), 1, sp, -(2**30) + 1)
  q_pos = _pad_to(q_pos.astype(jnp.int32), 1, tp, 0)
  kv_pos = _pad_to(kv_pos.astype(jnp.int32), 1, sp, 0)
  out, lse = _flash(qg, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk,
                    causal)  # fmt: skip
  out = _ungroup(out[:, :, :, :t])
  if not return_lse:
    return out
  return out, lse[:, :, :, :t].transpose(0, 3, 1, 2).reshape(b, t, h)


def _block_logits(qb, kb, qs, ks, qp, kp, scale, causal):
  """Masked f32 logits of one block: [B, K, G, bq, bk]."""
  logits = jnp.einsum(
      "bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32
  )
  m = qs[:, :, None] == ks[:, None, :]
  if causal:
    m &= kp[:, None, :] <= qp[:, :, None]
  return jnp.where(m[:, None, None], logits * scale, NEG)


def _slice(x, axis, i, n):
  return jax.lax.dynamic_slice_in_dim(x, i * n, n, axis)


def _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk, causal):
  """Returns out [B, K, G, T, d] (v's dtype) and lse f32[B, K, G, T]."""
  b, kh, g, t, d = q.shape
  nq, nk = t // bq, k.shape[2] // bk

  def q_block(i):
    qb = _slice(q, 3, i, bq)
    qs, qp = _slice(q_seg, 1, i, bq), _slice(q_pos, 1, i, bq)

    def k_step(carry, j):
      m, l, acc = carry
      kb, vb = _slice(k, 2, j, bk), _slice(v, 2, j, bk)
      ks, kp = _slice(kv_seg, 1, j, bk), _slice(kv_pos, 1, j, bk)
      s = _block_logits(qb, kb, qs, ks, qp, kp, scale, causal)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      pv = jnp.einsum(
          "bkgqs,bksd->bkgqd",
          p.astype(v.dtype),
          vb,
          preferred_element_type=jnp.float32,
      )
      return (m_new, l, acc * corr[..., None] + pv), None

    init = (
        jnp.full((b, kh, g, bq), NEG, jnp.float32),
        jnp.zeros((b, kh, g, bq), jnp.float32),
        jnp.zeros((b, kh, g, bq, d), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
    return (acc / l[..., None]).astype(v.dtype), m + jnp.log(l)

  outs, lses = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, ...]
  out = jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, t, d)
  lse = jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, t)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk, causal):
  return _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk,
                  causal)  # fmt: skip


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk, causal):
  out, lse = _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk,
                      causal)  # fmt: skip
  return (out, lse), (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _flash_bwd(scale, bq, bk, causal, res, cotangents):
  """FlashAttention-2's backward, with a cotangent for the lse too:
  dL/ds = p * (dp - delta + dlse)."""
  q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
  dout, dlse = cotangents
  b, kh, g, t, d = q.shape
  nq, nk = t // bq, k.shape[2] // bk
  delta = jnp.sum(
      dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1
  )  # [B, K, G, T]
  delta = delta - dlse.astype(jnp.float32)

  def k_block(dq, j):
    kb, vb = _slice(k, 2, j, bk), _slice(v, 2, j, bk)
    ks, kp = _slice(kv_seg, 1, j, bk), _slice(kv_pos, 1, j, bk)

    def q_step(carry, i):
      dq, dk, dv = carry
      qb = _slice(q, 3, i, bq)
      qs, qp = _slice(q_seg, 1, i, bq), _slice(q_pos, 1, i, bq)
      dob = _slice(dout, 3, i, bq)
      s = _block_logits(qb, kb, qs, ks, qp, kp, scale, causal)
      p = jnp.exp(s - _slice(lse, 3, i, bq)[..., None])  # [B,K,G,bq,bk]
      dv = dv + jnp.einsum(
          "bkgqs,bkgqd->bksd", p.astype(dob.dtype), dob,
          preferred_element_type=jnp.float32,
      )  # fmt: skip
      dp = jnp.einsum(
          "bkgqd,bksd->bkgqs", dob, vb, preferred_element_type=jnp.float32
      )
      ds = p * (dp - _slice(delta, 3, i, bq)[..., None]) * scale
      dq_i = jnp.einsum(
          "bkgqs,bksd->bkgqd", ds.astype(kb.dtype), kb,
          preferred_element_type=jnp.float32,
      )  # fmt: skip
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, _slice(dq, 3, i, bq) + dq_i, i * bq, 3
      )
      dk = dk + jnp.einsum(
          "bkgqs,bkgqd->bksd", ds.astype(qb.dtype), qb,
          preferred_element_type=jnp.float32,
      )  # fmt: skip
      return (dq, dk, dv), None

    zeros_kv = jnp.zeros((b, kh, bk, d), jnp.float32)
    (dq, dk, dv), _ = jax.lax.scan(
        q_step, (dq, zeros_kv, zeros_kv), jnp.arange(nq)
    )
    return dq, (dk, dv)

  dq, (dks, dvs) = jax.lax.scan(
      k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk)
  )
  dk = jnp.moveaxis(dks, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dvs, 0, 2).reshape(v.shape)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None, None, None, None)  # fmt: skip


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------
# splash: the Pallas TPU kernel.
# ---------------------------------------------------------------------------

SPLASH_BLOCK = 512  # largest tile; lengths are padded to multiples of 128


def _splash_blocks(t: int, s: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top

  bq = max(b for b in (128, 256, SPLASH_BLOCK) if t % b == 0)
  bk = max(b for b in (128, 256, SPLASH_BLOCK) if s % b == 0)
  return sk.BlockSizes(
      block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
      block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
      block_kv_dq=bk,
  )  # fmt: skip


def splash_attention(
    q,
    k,
    v,
    q_seg,
    kv_seg,
    q_pos,
    kv_pos,
    *,
    scale,
    causal_offset=None,
    interpret=None,
    return_lse=False,
):
  """The TPU splash kernel (Pallas); same contract as `xla_attention`.

  Causality must be the static structure `kv_pos = arange(S)`, `q_pos =
  causal_offset + arange(T)` (queries after `causal_offset` earlier keys);
  padding and images are segment ids. T and S are padded to multiples of
  128 with segments that match only each other. `interpret` runs the kernel
  in the Pallas interpreter (any backend; default: off on TPU).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top

  del kv_pos
  if return_lse:
    raise ValueError("splash attention does not return the log-sum-exp")
  causal = q_pos is not None
  if causal and causal_offset is None:
    raise ValueError("splash attention needs a static causal_offset")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  b, t, h, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  tp, sp = -(-t // 128) * 128, -(-s // 128) * 128
  pad = -(2**30)
  qg = _pad_to(_group(q * jnp.asarray(scale, q.dtype), kh), 3, tp, 0)
  k, v = _pad_to(k, 2, sp, 0), _pad_to(v, 2, sp, 0)
  q_seg = _pad_to(q_seg.astype(jnp.int32), 1, tp, pad)
  kv_seg = _pad_to(kv_seg.astype(jnp.int32), 1, sp, pad)
  g = h // kh
  if causal:
    mask = sm.CausalMask((tp, sp), offset=int(causal_offset))
  else:
    mask = sm.FullMask((tp, sp))
  kernel = sk.make_splash_mqa(
      sm.MultiHeadMask([mask] * g),
      block_sizes=_splash_blocks(tp, sp),
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
  )

  def one(qe, ke, ve, qs, ks):  # one example: [K, G, T, d], [K, S, d]
    seg = sk.SegmentIds(q=qs, kv=ks)
    return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=seg))(
        qe, ke, ve
    )

  out = jax.vmap(one)(qg, k, v, q_seg, kv_seg)  # [B, K, G, T, d]
  return _ungroup(out[:, :, :, :t])


# ---------------------------------------------------------------------------
# cudnn: the fused kernel behind `jax.nn.dot_product_attention`.
# ---------------------------------------------------------------------------


def cudnn_supports(q, *, causal, causal_offset, t, s, return_lse) -> bool:
  """Whether `cudnn_attention` can take this call (else `flash` does).

  cuDNN takes causal self-attention over one contiguous run of real tokens
  per row (rolled to the front, given as lengths), in bf16 or fp16. Not
  the log-sum-exp a shared prefix merges with: JAX's cuDNN rule drops its
  cotangent.
  """
  return (
      causal
      and causal_offset == 0
      and t == s
      and not return_lse
      and q.dtype in (jnp.bfloat16, jnp.float16)
      and q.shape[-1] % 8 == 0
      and q.shape[-1] <= 128
  )


def _roll_rows(x, shift, axis=1):
  """Row b of x rolled left by shift[b] along `axis` (a per-row gather)."""
  n = x.shape[axis]
  idx = (jnp.arange(n)[None] + shift[:, None]) % n  # [B, n]
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  if axis != 1:
    raise ValueError("rows roll along axis 1")
  return jnp.take_along_axis(x, idx, axis=1)


def cudnn_attention(
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, scale, implementation="cudnn"
):
  """Causal self-attention through `jax.nn.dot_product_attention`.

  Each row's real tokens (segment 1, one contiguous run: left- or
  right-padded) are rolled to the front and given as sequence lengths, the
  form the cuDNN kernel takes; the output is rolled back. Padding rows are
  garbage, as in every implementation. `implementation='xla'` runs the same
  call through XLA (how the tests check it on CPU).
  """
  del q_seg, q_pos, kv_pos
  real = kv_seg > 0
  start = jnp.argmax(real, axis=1).astype(jnp.int32)
  lengths = real.sum(axis=1).astype(jnp.int32)
  heads_last = lambda x: x.transpose(0, 2, 1, 3)  # [B, K, S, d] -> [B,S,K,d]
  out = jax.nn.dot_product_attention(
      _roll_rows(q, start),
      _roll_rows(heads_last(k), start),
      _roll_rows(heads_last(v), start),
      scale=scale,
      is_causal=True,
      query_seq_lengths=lengths,
      key_value_seq_lengths=lengths,
      implementation=implementation,
  )
  return _roll_rows(out, -start)


# ---------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------

IMPLEMENTATIONS = ("auto", "xla", "flash", "splash", "cudnn")


def resolve(impl: str) -> str:
  """'auto' -> the implementation for the default backend: XLA's masked
  softmax on CPU (`attend` switches to flash from `CPU_FLASH_MIN_KEYS`
  keys), splash on TPU, cuDNN on GPU (each with `flash` for what its kernel
  cannot take)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown attention implementation {impl!r}; known: {IMPLEMENTATIONS}"
    )
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  return {"cpu": "xla", "tpu": "splash", "gpu": "cudnn"}.get(backend, "flash")


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    q_pos: jax.Array | None = None,
    kv_pos: jax.Array | None = None,
    scale: float,
    impl: str = "auto",
    return_lse: bool = False,
    causal_offset: int | None = None,
):
  """Grouped-query attention under the module's masking convention.

  Args:
    q: [B, T, H, d].
    k, v: [B, K, S, d] (heads first, the KV-cache layout), H % K == 0.
    q_seg, kv_seg: int[B, T], int[B, S] segment ids.
    q_pos, kv_pos: int[B, T], int[B, S] positions for causality, or None
      (no causal constraint).
    scale: logit scale.
    impl: 'auto', 'xla', 'flash', 'splash' or 'cudnn'.
    return_lse: also return the float32 log-sum-exp [B, T, H] (for `merge`).
    causal_offset: a static int when `kv_pos = arange(S)` and `q_pos =
      causal_offset + arange(T)` (what the splash kernel's static causal
      mask needs); None otherwise.

  Returns:
    [B, T, H, d] in v's dtype (and the lse). Logits and softmax statistics
    are float32.
  """
  auto = impl == "auto"
  impl = resolve(impl)
  blocks = {}
  if auto and impl == "xla" and k.shape[2] >= CPU_FLASH_MIN_KEYS:
    impl = "flash"
    blocks = dict(zip(("block_q", "block_k"), CPU_FLASH_BLOCKS))
  if impl == "splash" and (
      return_lse or (q_pos is not None and causal_offset is None)
  ):
    impl = "flash"  # a shape the static kernel cannot take
  if impl == "cudnn":
    if not cudnn_supports(
        q, causal=q_pos is not None, causal_offset=causal_offset,
        t=q.shape[1], s=k.shape[2], return_lse=return_lse,
    ):  # fmt: skip
      impl = "flash"
    else:
      return cudnn_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos,
                             scale=scale)  # fmt: skip
  if impl == "splash":
    return splash_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos,
                            scale=scale, causal_offset=causal_offset)  # fmt: skip
  if impl == "flash":
    return flash_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale=scale,
                           return_lse=return_lse, **blocks)  # fmt: skip
  return xla_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale=scale,
                       return_lse=return_lse)  # fmt: skip
