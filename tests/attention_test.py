"""Attention kernels: every implementation equals the masked softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faithful_rl.models import attention


def _inputs(seed, b, t, s, h, kh, d, *, causal, offset=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, kh, s, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, kh, s, d)), dtype)
  # Left padding of different lengths (segment 0) and real tokens (1).
  pad = rng.integers(0, s // 3, size=b)
  kv_seg = (np.arange(s)[None] >= pad[:, None]).astype(np.int32)
  if causal:
    q_pos = offset + np.arange(t)[None].repeat(b, 0)
    kv_pos = np.arange(s)[None].repeat(b, 0)
    q_seg = np.take_along_axis(kv_seg, np.minimum(q_pos, s - 1), 1)
  else:
    q_pos = kv_pos = None
    q_seg = kv_seg[:, :t]
  j = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  mask = dict(
      q_seg=j(q_seg), kv_seg=j(kv_seg), q_pos=j(q_pos), kv_pos=j(kv_pos)
  )
  return q, k, v, mask


def _naive(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale):
  """Dense [B, H, T, S] softmax with GQA by repeating k and v."""
  g = q.shape[2] // k.shape[1]
  k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
  logits = jnp.einsum("bthd,bhsd->bhts", q, k) * scale
  m = q_seg[:, :, None] == kv_seg[:, None, :]
  if q_pos is not None:
    m &= kv_pos[:, None, :] <= q_pos[:, :, None]
  logits = jnp.where(m[:, None], logits, -1e30)
  return jnp.einsum("bhts,bhsd->bthd", jax.nn.softmax(logits, -1), v)


CASES = [
    # (b, t, s, h, kh, d, causal, offset): self-attention, a shared prompt
    # prefix (queries after `offset` cached keys), GQA, non-causal segments.
    (2, 24, 24, 4, 2, 8, True, 0),
    (2, 10, 33, 4, 2, 8, True, 23),
    (2, 37, 37, 6, 3, 16, False, 0),
    (1, 19, 19, 4, 4, 8, True, 0),
]


@pytest.mark.parametrize("case", CASES)
def test_flash_equals_xla_values_and_gradients(case):
  b, t, s, h, kh, d, causal, offset = case
  q, k, v, mask = _inputs(0, b, t, s, h, kh, d, causal=causal, offset=offset)
  # Only rows of real queries are compared (padding rows are garbage).
  real = np.asarray(mask["q_seg"], bool)[..., None, None]
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape)) * real

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  ref = lambda q, k, v: attention.xla_attention(q, k, v, **mask, scale=0.3)
  naive = lambda q, k, v: _naive(q, k, v, **mask, scale=0.3)
  # Blocks that do not divide T or S, and several blocks in each direction.
  flash = lambda q, k, v: attention.flash_attention(
      q, k, v, **mask, scale=0.3, block_q=8, block_k=7
  )
  out_ref, out_flash = ref(q, k, v), flash(q, k, v)
  np.testing.assert_allclose(out_ref * real, naive(q, k, v) * real, atol=1e-6)
  np.testing.assert_allclose(out_flash * real, out_ref * real, atol=1e-6)
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  g_fl = jax.grad(lambda *a: loss(flash, *a), argnums=(0, 1, 2))(q, k, v)
  for a, c in zip(g_ref, g_fl):
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_flash_padding_rows_stay_finite():
  q, k, v, mask = _inputs(2, 2, 16, 16, 2, 1, 8, causal=True)
  out = attention.flash_attention(q, k, v, **mask, scale=0.3, block_q=4,
                                  block_k=4)  # fmt: skip
  g = jax.grad(
      lambda q: attention.flash_attention(q, k, v, **mask, scale=0.3).sum()
  )(q)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(g).all()


def test_flash_memory_is_linear_in_length():
  """The compiled flash program holds no [T, S] tensor; xla's does."""
  b, h, d, n = 1, 4, 16, 4096

  def temp_bytes(fn):
    q = jax.ShapeDtypeStruct((b, n, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, h, n, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, n), jnp.int32)

    def f(q, k, v, seg):
      out = fn(q, k, v, seg, seg, seg, seg, scale=0.25)
      return jnp.sum(out**2)

    lowered = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv, seg)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  scores = b * h * n * n * 4  # one float32 [B, H, T, S] tensor
  assert temp_bytes(attention.xla_attention) > scores
  assert temp_bytes(attention.flash_attention) < scores / 4


def test_auto_on_cpu_is_flash_from_the_key_threshold_on():
  """Below `CPU_FLASH_MIN_KEYS` keys 'auto' is xla's program, from there
  on flash's (no [T, S] scores among its temporaries); both equal the
  dense softmax."""
  n = attention.CPU_FLASH_MIN_KEYS
  b, h, d = 1, 2, 8

  def temp_bytes(s):
    q = jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, h, s, d), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, s), jnp.int32)
    f = lambda q, k, v, seg: attention.attend(
        q, k, v, q_seg=seg, kv_seg=seg, scale=0.25, impl="auto"
    )
    return jax.jit(f).lower(q, kv, kv, seg).compile().memory_analysis(
    ).temp_size_in_bytes  # fmt: skip

  assert temp_bytes(n - 8) > b * h * (n - 8) ** 2 * 4
  # flash holds a few [128, 1024] tiles, each 1/8 of the [T, S] scores
  assert temp_bytes(n) < b * h * n * n * 4 / 2
  for s in (n - 8, n):
    q, k, v, mask = _inputs(7, b, s, s, h, h, d, causal=False)
    out = attention.attend(q, k, v, **mask, scale=0.25, impl="auto")
    real = np.asarray(mask["q_seg"], bool)[..., None, None]
    want = _naive(q, k, v, **mask, scale=0.25)
    np.testing.assert_allclose(
        np.where(real, out, 0), np.where(real, want, 0), atol=1e-5
    )


def test_unknown_implementation_is_an_error():
  with pytest.raises(ValueError, match="cudnn9"):
    attention.resolve("cudnn9")


@pytest.mark.parametrize("case", CASES)
def test_splash_equals_xla_in_the_interpreter(case):
  """The TPU kernel (run by the Pallas interpreter) under our masks."""
  b, t, s, h, kh, d, causal, offset = case
  q, k, v, mask = _inputs(3, b, t, s, h, kh, d, causal=causal, offset=offset)
  real = np.asarray(mask["q_seg"], bool)[..., None, None]
  ref = attention.xla_attention(q, k, v, **mask, scale=0.3)
  out = attention.attend(
      q, k, v, **mask, scale=0.3, impl="splash",
      causal_offset=offset if causal else None,
  )  # fmt: skip
  np.testing.assert_allclose(out * real, ref * real, atol=2e-6)
  w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape)) * real
  grad = lambda impl: jax.grad(
      lambda q, k, v: jnp.sum(
          attention.attend(q, k, v, **mask, scale=0.3, impl=impl,
                           causal_offset=offset if causal else None) * w
      ),
      argnums=(0, 1, 2),
  )(q, k, v)  # fmt: skip
  for a, c in zip(grad("xla"), grad("splash")):
    np.testing.assert_allclose(a, c, atol=2e-5)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_cudnn_path_through_xla_equals_masked_softmax(pad_side):
  """The cuDNN call's arguments (rows rolled to the front, lengths, causal),
  checked by running the same `jax.nn.dot_product_attention` call on XLA."""
  b, t, h, kh, d = 3, 17, 4, 2, 8
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, kh, t, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, kh, t, d)), jnp.float32)
  n = np.array([17, 9, 4])
  pos = np.arange(t)[None]
  real = pos >= t - n[:, None] if pad_side == "left" else pos < n[:, None]
  seg = jnp.asarray(real, jnp.int32)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = dict(q_seg=seg, kv_seg=seg, q_pos=slots, kv_pos=slots)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, **mask, scale=0.3)
  ours = lambda q, k, v: attention.cudnn_attention(
      q, k, v, **mask, scale=0.3, implementation="xla"
  )
  keep = np.asarray(real)[..., None, None]
  np.testing.assert_allclose(ours(q, k, v) * keep, ref(q, k, v) * keep,
                             atol=1e-6)  # fmt: skip
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * keep
  g = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * w), (0, 1, 2))(q, k, v)
  for a, c in zip(g(ref), g(ours)):
    np.testing.assert_allclose(a, c, atol=1e-5)
  # What the dispatcher sends to cuDNN, and what it leaves to flash.
  bf = q.astype(jnp.bfloat16)
  assert attention.cudnn_supports(
      bf, causal=True, causal_offset=0, t=t, s=t, return_lse=False
  )
  for kw in (dict(causal_offset=3, s=t + 3), dict(return_lse=True)):
    args = dict(causal=True, causal_offset=0, t=t, s=t, return_lse=False)
    assert not attention.cudnn_supports(bf, **(args | kw))
  assert not attention.cudnn_supports(
      q, causal=True, causal_offset=0, t=t, s=t, return_lse=False
  )  # float32: flash
