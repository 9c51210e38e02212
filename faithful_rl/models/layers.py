"""Building blocks shared by the Qwen-VL vision tower and decoder.

Numerics follow `transformers` so that float32 outputs agree to ~1e-6:
RMSNorm statistics in float32, rotary embeddings applied in float32 for
the vision tower and in the activation dtype for the decoder, attention
softmax in float32.

Axis alphabet: B batch, T query positions, S key positions, H query heads,
K key/value heads, G query heads per key/value head, d head dim, D model
width, F MLP width, Q probed query rows, V visual key columns.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}")
  return ACTIVATIONS[name]


def linear(
    din: int,
    dout: int,
    *,
    bias: bool,
    dtype,
    param_dtype=None,
    rngs: nnx.Rngs,
    std: float = 0.02,
) -> nnx.Linear:
  """A Linear with HF's init (normal(0.02) kernel, zero bias).

  Parameters are stored in `param_dtype` (default `dtype`) and cast to
  `dtype` where the product runs: float32 masters with bf16 compute.
  """
  return nnx.Linear(
      din,
      dout,
      use_bias=bias,
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      kernel_init=nnx.initializers.normal(std),
      bias_init=nnx.initializers.zeros_init(),
      rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """y = w * (x / rms(x)), statistics in float32, scale in the input dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype=None):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype or dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    in_dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(in_dtype)
    return self.weight[...].astype(in_dtype) * normed


class ZeroCenteredRMSNorm(nnx.Module):
  """y = (1 + w) * (x / rms(x)), all in float32, cast to the input dtype.

  Qwen3.5's (Gemma's) norm: the weight is stored centred on zero (zeros at
  initialisation), and the scale is applied before the cast back.
  """

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype=None):
    self.weight = nnx.Param(jnp.zeros((dim,), param_dtype or dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(var + self.eps)
    return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(
        x.dtype
    )


class LayerNorm(nnx.Module):
  """torch's LayerNorm (weight and bias): statistics and affine in float32."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype=None):
    param_dtype = param_dtype or dtype
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    w = self.weight[...].astype(x.dtype).astype(jnp.float32)
    b = self.bias[...].astype(x.dtype).astype(jnp.float32)
    return (y * w + b).astype(x.dtype)


class MLP(nnx.Module):
  """linear_fc2(act(linear_fc1(x))), both with biases (Qwen3-VL's ViT)."""

  def __init__(
      self, dim: int, hidden: int, *, act: str, dtype, param_dtype=None, rngs
  ):
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_fc1 = linear(dim, hidden, **kw)
    self.linear_fc2 = linear(hidden, dim, **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_fc2(self.act(self.linear_fc1(x)))


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x))."""

  def __init__(
      self,
      dim: int,
      hidden: int,
      *,
      act: str,
      bias: bool,
      dtype,
      param_dtype=None,
      rngs,
  ):
    kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = linear(dim, hidden, **kw)
    self.up_proj = linear(dim, hidden, **kw)
    self.down_proj = linear(hidden, dim, **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------
# Activation sharding.
# ---------------------------------------------------------------------------

BATCH_AXES = ("data", "fsdp")


def shard_batch(x: jax.Array) -> jax.Array:
  """Constrains x's leading (batch) axis to the mesh's batch axes.

  Under a mesh (`jax.set_mesh`) with FSDP-sharded weights, XLA may
  otherwise keep activations whole on every device and shard the weights'
  contraction instead; pinning the residual stream to the batch axes makes
  it gather each layer's weights (FSDP) and keeps activations per device.
  A no-op without a mesh or when the batch does not divide.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  if n <= 1 or x.shape[0] % n:
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------
# Stacked layers: one scanned layer over parameters with a leading axis.
# ---------------------------------------------------------------------------

REMAT_POLICIES = {
    # Keep everything for the backward pass.
    "none": None,
    # Keep only each layer's input; recompute the layer in the backward.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the matmul outputs (projections, MLP), recompute the rest.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(
        f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}"
    )
  return REMAT_POLICIES[name]


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs):
  """n layers built by `make(rngs)`, as one module whose parameters carry a
  leading [n] axis (each layer initialised from its own split of `rngs`)."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def build(rngs):
    return make(rngs)

  return build(rngs)


def layer_slice(stack: nnx.Module, i: int) -> nnx.Module:
  """Layer i of a stacked module, as an ordinary (unstacked) module."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def run_stack(
    stack: nnx.Module,
    fn: Callable[..., tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    start: int,
    stop: int,
    remat: str = "none",
    scan: bool = True,
) -> tuple[Any, Any]:
  """(carry, y_i) = fn(layer_i, carry, i, x_i) for i in [start, stop).

  Like `lax.scan` over layers: `xs` (leaves with a leading [stop - start]
  axis, or None) are sliced per layer, the returned ys are stacked. With
  `scan` the layers run as one `lax.scan` over the stacked parameters (the
  program does not grow with depth); without it, as a Python loop over the
  same parameters (the unrolled reference). `remat` names a policy of
  `REMAT_POLICIES`: what each layer keeps for the backward pass, beyond its
  carry and its xs.

  Returns:
    (final carry, stacked ys, None when there are no layers).
  """
  if stop <= start:
    return carry, None
  graphdef, state = nnx.split(stack)
  n = jax.tree.leaves(state)[0].shape[0]
  if (start, stop) != (0, n):
    state = jax.tree.map(lambda a: a[start:stop], state)

  def step(carry, inputs):
    i, layer_state, x = inputs
    return fn(nnx.merge(graphdef, layer_state), carry, i, x)

  if remat != "none":
    step = jax.checkpoint(
        step, policy=remat_policy(remat), prevent_cse=not scan
    )
  idx = jnp.arange(start, stop, dtype=jnp.int32)
  if scan:
    return jax.lax.scan(step, carry, (idx, state, xs))
  ys = []
  for j in range(stop - start):
    take = lambda a, j=j: a[j]
    carry, y = step(carry, (idx[j], jax.tree.map(take, state),
                            jax.tree.map(take, xs)))  # fmt: skip
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x[..., T, H, d] rotated by cos/sin[..., T, r] (broadcast over H).

  With r < d (partial rotary, Qwen3.5) only the first r features rotate;
  the other d - r pass through.
  """
  cos, sin = cos[..., None, :], sin[..., None, :]
  r = cos.shape[-1]
  if r < x.shape[-1]:
    rot, rest = x[..., :r], x[..., r:]
    return jnp.concatenate([rot * cos + rotate_half(rot) * sin, rest], -1)
  return x * cos + rotate_half(x) * sin


def mrope_axes(head_dim: int, section: tuple[int, ...], interleaved: bool):
  """Which position axis (0 T, 1 H, 2 W) drives each of the d/2 frequencies.

  Chunked (Qwen2.5-VL): `section[0]` frequencies from T, then `section[1]`
  from H, then `section[2]` from W, cycling. Interleaved (Qwen3-VL), as
  `transformers`' slicing: T everywhere, then H at 1, 4, ... below
  3 * section[1] and W at 2, 5, ... below 3 * section[2] (THWTHW...T).
  """
  half = head_dim // 2
  if not interleaved:
    if sum(section) != half:
      raise ValueError(f"mrope_section {section} must sum to head_dim/2")
    return np.concatenate(
        [np.full(n, i % 3) for i, n in enumerate(section)]
    ).astype(np.int32)
  if len(section) != 3:
    raise ValueError(f"interleaved mrope_section {section} needs 3 entries")
  axes = np.zeros(half, np.int32)
  axes[1 : 3 * section[1] : 3] = 1
  axes[2 : 3 * section[2] : 3] = 2
  return axes


def mrope_cos_sin(
    position_ids: jax.Array,
    *,
    head_dim: int,
    theta: float,
    section: tuple[int, ...],
    dtype,
    interleaved: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Multimodal RoPE tables.

  Args:
    position_ids: int[3, B, T], (temporal, row, column) positions.
    head_dim: d.
    theta: rope base.
    section: frequencies taken from each axis (see `mrope_axes`).
    dtype: output dtype (HF casts the tables to the activation dtype).
    interleaved: Qwen3-VL's interleaved layout (else chunked).

  Returns:
    cos, sin: dtype[B, T, d].
  """
  axes = mrope_axes(head_dim, section, interleaved)
  inv_freq = 1.0 / (
      theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  )
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3,B,T,d/2]
  freqs = jnp.where(axes == 0, freqs[0], jnp.where(axes == 1, freqs[1],
                                                    freqs[2]))  # fmt: skip
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
