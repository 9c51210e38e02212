"""Gated DeltaNet: the linear-attention layer of Qwen3.5 (and Qwen3-Next).

Each layer keeps, per value head, a recurrent state S [dk, dv] that every
token t decays and corrects by the delta rule:

  S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - k_t^T exp(g_t) S_{t-1}))^T
  o_t = q_t^T S_t

with q, k L2-normalised (q also scaled by dk^-1/2), beta_t = sigmoid(b_t)
and g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0. The q/k/v inputs come
from a depthwise causal convolution (kernel `linear_conv_kernel_dim`, no
bias) followed by SiLU; the output is RMS-normalised per head, gated by
SiLU(z) and projected back to the width.

Two forms of the same recurrence, both as `transformers` computes them:

* `chunk_gated_delta_rule`, for training and prefill: chunks of 64 tokens
  (transformers' `chunk_size`), inside each chunk the delta rule's
  triangular system solved at once (the UT transform), and a `lax.scan`
  over chunks (not tokens) carrying S;
* `recurrent_gated_delta_rule`, the token-by-token update, for decoding
  (one token a step) and as the reference the chunked form is tested
  against.

The layer's decoding state is `(conv_state [B, kernel - 1, C],
recurrent_state float32[B, Hv, dk, dv])`: the last kernel - 1 inputs of
the convolution and S.

Padding: as transformers, the layer's input is zeroed at padding positions
(`key_mask`) before the projections, so left padding leaves the state
exactly zero (k = v = 0 there) and the convolution sees zeros before the
first real token, as an unpadded sequence does.

Axis alphabet: B batch, T tokens, C conv channels (2 key_dim + value_dim),
Hk key heads, Hv value heads, dk / dv head dims, N chunks, L chunk length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import layers

CHUNK_SIZE = 64  # transformers' torch_chunk_gated_delta_rule default


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum(x^2) + eps) over the last axis (FLA's and HF's form)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """The gated delta rule over whole sequences, chunk by chunk.

  Args:
    q: float32[B, T, H, dk], L2-normalised, not yet scaled.
    k: float32[B, T, H, dk], L2-normalised.
    v: float32[B, T, H, dv].
    g: float32[B, T, H], log decays (<= 0).
    beta: float32[B, T, H], write strengths in (0, 1).
    initial_state: float32[B, H, dk, dv] or None (zeros).
    chunk_size: L.

  Returns:
    (outputs float32[B, T, H, dv], final state float32[B, H, dk, dv]).
  """
  b, t, h, dk = k.shape
  dv = v.shape[-1]
  c = chunk_size
  pad = (-t) % c
  n = (t + pad) // c
  q = q * dk**-0.5

  def chunks(x):  # [B, T, H, ...] -> [B, H, N, L, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(b, h, n, c, *x.shape[3:])

  q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
  k_beta = k * beta[..., None]
  v_beta = v * beta[..., None]
  cum = jnp.cumsum(g, axis=-1)  # [B, H, N, L]
  upper = np.triu(np.ones((c, c), bool), 1)
  # exp(cum_i - cum_j) for j <= i: the decay between positions j and i.
  pairwise = jnp.exp(
      jnp.where(upper, -jnp.inf, cum[..., :, None] - cum[..., None, :])
  )
  mm = lambda x, y: jnp.einsum("...ij,...jk->...ik", x, y)
  system = mm(k_beta, jnp.swapaxes(k, -1, -2)) * pairwise
  intra = mm(q, jnp.swapaxes(k, -1, -2)) * pairwise
  # (I + strictly lower part of `system`) X = rhs, as HF's unitriangular
  # solve: the delta rule's within-chunk dependencies in one solve.
  solve = lambda rhs: jax.lax.linalg.triangular_solve(
      system, rhs, left_side=True, lower=True, unit_diagonal=True
  )
  new_values = solve(v_beta)  # [B, H, N, L, dv]
  k_cumdecay = solve(k_beta * jnp.exp(cum)[..., None])  # [B, H, N, L, dk]
  q_decayed = q * jnp.exp(cum)[..., None]
  k_decayed = k * jnp.exp(cum[..., -1:] - cum)[..., None]
  chunk_decay = jnp.exp(cum[..., -1])[..., None, None]  # [B, H, N, 1, 1]

  def step(state, xs):
    nv, kc, qd, kd, ia, cd = xs
    v_new = nv - mm(kc, state)
    out = mm(qd, state) + mm(ia, v_new)
    state = state * cd + mm(jnp.swapaxes(kd, -1, -2), v_new)
    return state, out

  if initial_state is None:
    initial_state = jnp.zeros((b, h, dk, dv), jnp.float32)
  over_chunks = lambda x: jnp.moveaxis(x, 2, 0)
  state, out = jax.lax.scan(
      step,
      initial_state.astype(jnp.float32),
      tuple(
          map(
              over_chunks,
              (new_values, k_cumdecay, q_decayed, k_decayed, intra,
               chunk_decay),
          )
      ),
  )  # fmt: skip
  out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * c, dv)[:, :, :t]
  return jnp.moveaxis(out, 1, 2), state


def recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The same rule token by token (arguments and results as
  `chunk_gated_delta_rule`'s): the decoding step, and the reference."""
  b, _, h, dk = k.shape
  q = q * dk**-0.5

  def step(state, xs):
    qt, kt, vt, gt, bt = xs  # [B, H, ...]
    state = state * jnp.exp(gt)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", state, kt)
    delta = (vt - kv_mem) * bt[..., None]
    state = state + kt[..., :, None] * delta[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, qt)

  if initial_state is None:
    initial_state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
  over_time = lambda x: jnp.moveaxis(x, 1, 0)
  state, out = jax.lax.scan(
      step,
      initial_state.astype(jnp.float32),
      tuple(map(over_time, (q, k, v, g, beta))),
  )
  return jnp.moveaxis(out, 0, 1), state


def causal_conv(
    x: jax.Array,
    kernel: jax.Array,
    state: jax.Array | None = None,
    act=jax.nn.silu,
) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution then `act`, continuing from `state`.

  Args:
    x: [B, T, C] inputs.
    kernel: [W, C], tap j multiplies the input W - 1 - j steps back.
    state: [B, W - 1, C], the inputs before x (None: zeros).

  Returns:
    (act(conv) [B, T, C], the new state: the last W - 1 inputs).
  """
  w = kernel.shape[0]
  b, t, ch = x.shape
  if state is None:
    state = jnp.zeros((b, w - 1, ch), x.dtype)
  full = jnp.concatenate([state.astype(x.dtype), x], axis=1)
  kernel = kernel.astype(x.dtype)
  out = sum(full[:, j : j + t] * kernel[j] for j in range(w))
  return act(out), full[:, t:]


class DepthwiseConv(nnx.Module):
  """The convolution's weights: kernel [W, C] (HF's conv1d.weight is [C,
  1, W])."""

  def __init__(self, width: int, channels: int, *, param_dtype, rngs):
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (width, channels), param_dtype))


class GatedDeltaNet(nnx.Module):
  """One Gated DeltaNet token mixer (HF's `Qwen3_5GatedDeltaNet`).

  `cfg` carries `hidden_size`, `rms_norm_eps`, `hidden_act` and the
  `linear_*` sizes of Qwen3.5's text config.
  """

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_k_heads = cfg.linear_num_key_heads
    self.num_v_heads = cfg.linear_num_value_heads
    self.head_k_dim = cfg.linear_key_head_dim
    self.head_v_dim = cfg.linear_value_head_dim
    if self.num_v_heads % self.num_k_heads:
      raise ValueError(
          f"linear_num_value_heads={self.num_v_heads} is not a multiple of"
          f" linear_num_key_heads={self.num_k_heads}"
      )
    self.key_dim = self.num_k_heads * self.head_k_dim
    self.value_dim = self.num_v_heads * self.head_v_dim
    self.dtype = dtype
    self.eps = cfg.rms_norm_eps
    self.act = layers.activation(cfg.hidden_act)
    d = cfg.hidden_size
    kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_proj_qkv = layers.linear(d, 2 * self.key_dim + self.value_dim, **kw)
    self.in_proj_z = layers.linear(d, self.value_dim, **kw)
    self.in_proj_b = layers.linear(d, self.num_v_heads, **kw)
    self.in_proj_a = layers.linear(d, self.num_v_heads, **kw)
    self.conv1d = DepthwiseConv(
        cfg.linear_conv_kernel_dim,
        2 * self.key_dim + self.value_dim,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.dt_bias = nnx.Param(jnp.ones((self.num_v_heads,), param_dtype))
    a = jax.random.uniform(
        rngs.params(), (self.num_v_heads,), minval=0.01, maxval=16.0
    )
    self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))  # pylint: disable=invalid-name
    self.norm = layers.RMSNorm(
        self.head_v_dim, eps=self.eps, dtype=dtype, param_dtype=param_dtype
    )
    self.out_proj = layers.linear(self.value_dim, d, **kw)

  def state_shapes(self, batch: int):
    """(conv state shape, recurrent state shape) of `batch` rows."""
    w, ch = self.conv1d.kernel.shape
    return (batch, w - 1, ch), (
        batch, self.num_v_heads, self.head_k_dim, self.head_v_dim,
    )  # fmt: skip

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array,
      state: tuple[jax.Array, jax.Array] | None = None,
  ):
    """Returns (output [B, T, D], new state (conv, recurrent)).

    Args:
      x: [B, T, D] normalised hidden states.
      mask: bool[B, T], real tokens (padding is zeroed first).
      state: the state before these tokens, or None (zeros). One token
        with a state takes the recurrent step, otherwise the chunked form.
    """
    b, t, _ = x.shape
    x = (x * mask[..., None]).astype(x.dtype)
    conv_state, rec_state = (None, None) if state is None else state
    mixed, conv_state = causal_conv(
        self.in_proj_qkv(x), self.conv1d.kernel[...], conv_state, self.act
    )
    q, k, v = jnp.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
    q = q.reshape(b, t, self.num_k_heads, self.head_k_dim)
    k = k.reshape(b, t, self.num_k_heads, self.head_k_dim)
    v = v.reshape(b, t, self.num_v_heads, self.head_v_dim)
    z = self.in_proj_z(x).reshape(b, t, self.num_v_heads, self.head_v_dim)
    beta = jax.nn.sigmoid(self.in_proj_b(x)).astype(jnp.float32)
    a = self.in_proj_a(x).astype(jnp.float32)
    a_log = self.A_log[...].astype(jnp.float32)
    g = -jnp.exp(a_log) * jax.nn.softplus(
        a + self.dt_bias[...].astype(jnp.float32)
    )
    # Grouped value heads: each q/k head serves Hv / Hk consecutive ones.
    rep = self.num_v_heads // self.num_k_heads
    q, k = (jnp.repeat(y, rep, axis=2) for y in (q, k))
    q, k = (l2norm(y.astype(jnp.float32)) for y in (q, k))
    v = v.astype(jnp.float32)
    if rec_state is not None and t == 1:
      out, rec_state = recurrent_gated_delta_rule(q, k, v, g, beta, rec_state)
    else:
      out, rec_state = chunk_gated_delta_rule(q, k, v, g, beta, rec_state)
    out = self.norm(out.astype(self.dtype))  # per head, before the gate
    # HF's gated norm: SiLU whatever hidden_act is.
    out = (out.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(
        self.dtype
    )
    return self.out_proj(out.reshape(b, t, self.value_dim)), (
        conv_state,
        rec_state,
    )
