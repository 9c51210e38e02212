"""The hybrid decoder of Qwen3.5: Gated DeltaNet and gated attention layers.

Most layers mix tokens with a Gated DeltaNet (`gated_deltanet.py`: linear
attention with a recurrent state); every `full_attention_interval`-th
layer (`layer_types`) is a gated full attention: Qwen3's attention (per
head q/k RMSNorm before RoPE) whose q projection also yields a per-feature
output gate, `o_proj(attention * sigmoid(gate))`, with RoPE on the first
`partial_rotary_factor` of each head's features. Every RMSNorm outside the
DeltaNet is zero-centred (`layers.ZeroCenteredRMSNorm`, weight 1 + w).

The layers are two kinds of module, so the text model holds them as a list
(`nnx.List`, HF's `layers.{i}`) that `vlm.VisionLanguageModel.decode` runs
as a Python loop (each layer rematerialised by the model's policy), not as
one scanned stack. Each layer's cache entry in a per-layer `KVCache` is
(keys, values) for an attention layer and (convolution state, recurrent
state) for a linear one (`KVCache.linear`).

The attention probe reads full-attention layers only: a linear layer has
no attention matrix, and asking for one is an error naming the layers that
have one (`HybridTextConfig.probe_layer` maps a recipe's layer to the
nearest of them).

Axis alphabet: B batch, T tokens, H heads, K kv heads, d head dim, D width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from faithful_rl.models import decoder
from faithful_rl.models import gated_deltanet
from faithful_rl.models import layers
from faithful_rl.models.config import TextConfig

FULL, LINEAR = "full_attention", "linear_attention"


def interval_layer_types(num_layers: int, interval: int) -> tuple[str, ...]:
  """transformers' default `layer_types`: full attention at every
  interval-th layer (3, 7, ... for 4), linear attention elsewhere."""
  return tuple(
      FULL if (i + 1) % interval == 0 else LINEAR for i in range(num_layers)
  )


@dataclasses.dataclass(frozen=True)
class HybridTextConfig(TextConfig):
  """Qwen3.5's text config: `TextConfig` plus the layer kinds and the Gated
  DeltaNet sizes (defaults: transformers' `Qwen3_5TextConfig`).

  `layer_types=()` means full attention at every fourth layer.
  """

  vocab_size: int = 248320
  hidden_size: int = 4096
  intermediate_size: int = 12288
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  num_key_value_heads: int = 4
  rope_theta: float = 10000.0
  mrope_section: tuple[int, ...] = (11, 11, 10)
  max_position_embeddings: int = 32768
  head_dim: int | None = 256
  qkv_bias: bool = False
  qk_norm: bool = True
  mrope_interleaved: bool = True
  layer_types: tuple[str, ...] = ()
  partial_rotary_factor: float = 0.25
  linear_conv_kernel_dim: int = 4
  linear_key_head_dim: int = 128
  linear_value_head_dim: int = 128
  linear_num_key_heads: int = 16
  linear_num_value_heads: int = 32

  def __post_init__(self):
    super().__post_init__()
    if not self.layer_types:
      object.__setattr__(
          self, "layer_types", interval_layer_types(self.num_hidden_layers, 4)
      )
    if len(self.layer_types) != self.num_hidden_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries for"
          f" num_hidden_layers={self.num_hidden_layers}"
      )
    bad = sorted(set(self.layer_types) - {FULL, LINEAR})
    if bad:
      raise ValueError(f"unsupported layer_types {bad}: {FULL!r}, {LINEAR!r}")
    if self.linear_num_value_heads % self.linear_num_key_heads:
      raise ValueError(
          f"linear_num_value_heads={self.linear_num_value_heads} is not a"
          f" multiple of linear_num_key_heads={self.linear_num_key_heads}"
      )

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def linear_layers(self) -> tuple[int, ...]:
    return tuple(i for i, k in enumerate(self.layer_types) if k == LINEAR)

  def linear_state_shapes(self, batch: int):
    """(convolution state, recurrent state) shapes of one linear layer."""
    channels = (
        2 * self.linear_num_key_heads * self.linear_key_head_dim
        + self.linear_num_value_heads * self.linear_value_head_dim
    )
    return (batch, self.linear_conv_kernel_dim - 1, channels), (
        batch, self.linear_num_value_heads, self.linear_key_head_dim,
        self.linear_value_head_dim,
    )  # fmt: skip

  def replace(self, **kwargs) -> "HybridTextConfig":
    """`TextConfig.replace`; a new depth re-derives the default layer
    pattern (full attention every fourth layer) unless layer_types is
    given."""
    if "num_hidden_layers" in kwargs and "layer_types" not in kwargs:
      kwargs["layer_types"] = ()
    return super().replace(**kwargs)


class GatedAttention(decoder.Attention):
  """Qwen3.5's full attention: q_proj yields [B, T, H, 2d], each head's
  queries then its output gate; zero-centred q/k norms; partial RoPE."""

  def __init__(self, cfg: HybridTextConfig, *, dtype, param_dtype, rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads = cfg.num_attention_heads
    self.num_kv_heads = cfg.num_key_value_heads
    self.head_dim = hd
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qkv = dict(bias=cfg.qkv_bias, **kw)
    self.q_proj = layers.linear(d, 2 * self.num_heads * hd, **qkv)
    self.k_proj = layers.linear(d, self.num_kv_heads * hd, **qkv)
    self.v_proj = layers.linear(d, self.num_kv_heads * hd, **qkv)
    self.o_proj = layers.linear(self.num_heads * hd, d, bias=cfg.o_bias, **kw)
    norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.q_norm = layers.ZeroCenteredRMSNorm(hd, **norm)
    self.k_norm = layers.ZeroCenteredRMSNorm(hd, **norm)

  def queries_keys(self, x, cos, sin):
    b, t, _ = x.shape
    h, hd = self.num_heads, self.head_dim
    q, gate = jnp.split(self.q_proj(x).reshape(b, t, h, 2 * hd), 2, axis=-1)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, hd)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    return q, k, gate.reshape(b, t, h * hd)

  def qk(self, x, cos, sin):
    return self.queries_keys(x, cos, sin)[:2]


class HybridDecoderLayer(nnx.Module):
  """Norm -> token mixer (Gated DeltaNet or gated attention) -> residual,
  norm -> gated MLP -> residual."""

  def __init__(
      self, cfg: HybridTextConfig, index: int, *, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.index = index
    self.kind = cfg.layer_types[index]
    self.full_layers = tuple(
        i for i, k in enumerate(cfg.layer_types) if k == FULL
    )
    if self.kind == LINEAR:
      self.linear_attn = gated_deltanet.GatedDeltaNet(cfg, rngs=rngs, **kw)
    else:
      self.self_attn = GatedAttention(cfg, rngs=rngs, **kw)
    self.mlp = layers.GatedMLP(
        cfg.hidden_size,
        cfg.intermediate_size,
        act=cfg.hidden_act,
        bias=False,
        rngs=rngs,
        **kw,
    )
    eps = cfg.rms_norm_eps
    norm = lambda: layers.ZeroCenteredRMSNorm(cfg.hidden_size, eps=eps, **kw)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()

  def __call__(
      self, x, cos, sin, ctx: decoder.Context, layer_cache, prefix=None
  ):
    """`decoder.DecoderLayer`'s call; a linear layer's cache entry (and what
    it returns in place of keys/values) is its (conv, recurrent) state."""
    h = self.input_layernorm(x)
    if self.kind == FULL:
      h, kv, probe = self.self_attn(h, cos, sin, ctx, layer_cache, prefix)
    else:
      if ctx.probe is not None:
        raise ValueError(
            f"decoder layer {self.index} is a linear-attention (Gated"
            " DeltaNet) layer and has no attention to probe; the"
            f" full-attention layers are {list(self.full_layers)}"
        )
      if prefix is not None:
        raise ValueError(
            "a linear-attention layer continues from its state, not from a"
            " shared prefix: start each row's cache from the prefix's"
            " (KVCache.with_linear_states)"
        )
      # As transformers: padding inputs are zeroed (the new tokens' slots).
      mask = jax.lax.dynamic_slice_in_dim(
          ctx.key_mask, ctx.cache_index, x.shape[1], 1
      )
      h, kv = self.linear_attn(h, mask, layer_cache)
      probe = None
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, kv, probe


class HybridTextModel(nnx.Module):
  """Token embedding, the list of hybrid layers and the final norm (the
  interface of `decoder.TextModel`, always unstacked)."""

  def __init__(self, cfg: HybridTextConfig, *, dtype, param_dtype, rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )
    self.layers = nnx.List(
        HybridDecoderLayer(
            cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        for i in range(cfg.num_hidden_layers)
    )
    self.norm = layers.ZeroCenteredRMSNorm(
        cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
        param_dtype=param_dtype,
    )  # fmt: skip

  unstacked = True  # the layers are separate modules (two kinds)

  def layer(self, i: int) -> HybridDecoderLayer:
    return self.layers[i]

  def unstack(self) -> None:
    """Nothing to do: the layers are already separate modules."""
