"""The vision-language model both Qwen-VL families are: a vision tower,
the stacked decoder, and one forward for training, rollout and evaluation.

* training / evaluation: `model(input_ids, attention_mask=..., vision=...,
  position_ids=..., attention_probe=...)` over whole sequences;
* rollout: the same call with a `KVCache`: the T new tokens are written at
  slots `cache_index .. cache_index + T - 1` and attend to every valid slot
  up to their own (prefill is T = prompt length, decoding T = 1).

A family (`Qwen2_5_VL`, `Qwen3_VL`) only supplies its vision tower
(`vision_tower`) and what it returns (`vision_features`): merged visual
tokens, plus for Qwen3-VL the DeepStack features that are added to the
visual positions after the first decoder layers. The call signature is
the same for every family, so rollout and training need no family code.

At scale: the decoder layers are ONE layer module whose parameters carry a
leading [L] axis, run as a `lax.scan` (`scan_layers`, the default) so the
program and its compile time do not grow with depth, each layer
rematerialised by the `remat` policy in the backward pass. Parameters are
stored in `param_dtype` (float32 masters for training) and computed in
`dtype` (bf16 on accelerators). The main attention never forms a
[B, T, S] mask or score tensor outside the `xla` implementation: masks are
segment ids and positions (`attention.attend`). Probed layers run outside
the scan, so only they pay for the probe. The sampler decodes with the
layers unstacked (`with_layers_unstacked`) and a per-layer `KVCache`, so
that no decoding step copies a layer's weights or cache out of a stack.

Axis alphabet: B batch, T query positions, S key positions, L layers,
K kv heads, d head dim, D width, V visual tokens, N DeepStack levels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from faithful_rl.models import attention as attention_lib
from faithful_rl.models import inputs as inputs_lib
from faithful_rl.models import layers
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.decoder import AttentionProbe
from faithful_rl.models.decoder import Context
from faithful_rl.models.decoder import KVCache
from faithful_rl.models.decoder import ModelOutput
from faithful_rl.models.decoder import write_at
from faithful_rl.models.decoder import TextModel
from faithful_rl.models.inputs import VisionInputs


class VisionLanguageModel(nnx.Module):
  """A Qwen-VL model for conditional generation (see the module docstring).

  A family subclass sets `vision_tower`, its tower's class.

  Args:
    config: the architecture.
    dtype: compute dtype (activations, matmul inputs, the KV cache).
    param_dtype: storage dtype of the parameters (default `dtype`); train
      with float32 here and bf16 compute.
    remat: what each layer keeps for the backward pass: 'none', 'full'
      (only its input) or 'dots' (its matmul outputs); see
      `layers.REMAT_POLICIES`.
    attention: the main attention's implementation, 'auto' (XLA on CPU,
      blocked flash there from 1,024 keys, splash on TPU, cuDNN on GPU),
      'xla', 'flash', 'splash' or 'cudnn' (see `attention`).
    scan_layers: run the layers as one `lax.scan` (False: a Python loop over
      the same stacked parameters, the unrolled reference).
    rngs: initialisation randomness.
  """

  vision_tower: type  # the family's tower class
  text_model: type = TextModel  # the decoder's class (Qwen3.5: hybrid)

  def __init__(
      self,
      config: ModelConfig,
      *,
      dtype=jnp.float32,
      param_dtype=None,
      remat: str = "none",
      attention: str = "auto",
      scan_layers: bool = True,
      rngs: nnx.Rngs,
  ):
    layers.remat_policy(remat)
    attention_lib.resolve(attention)
    param_dtype = param_dtype or dtype
    self.config = config
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.remat = remat
    self.attention = attention
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.visual = self.make_visual(config.vision, **kw)
    self.language_model = self.text_model(config.text, **kw)
    if not config.text.tie_word_embeddings:
      self.lm_head = layers.linear(
          config.text.hidden_size, config.text.vocab_size, bias=False, **kw
      )

  def make_visual(self, vcfg, *, dtype, param_dtype, rngs) -> nnx.Module:
    """The family's vision tower: `vision_tower` built with this model's
    dtypes, remat, attention and scan settings."""
    return self.vision_tower(
        vcfg,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=self.remat,
        attention=self.attention,
        scan_layers=self.scan_layers,
        rngs=rngs,
    )

  def vision_features(self, vision: VisionInputs):
    """(merged visual tokens [B, V, D], DeepStack features [N, B, V, D] or
    None), tokens in image order."""
    return self.visual(vision), None

  # -------------------------------------------------------------------
  # Pieces, usable on their own.
  # -------------------------------------------------------------------

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.language_model.embed_tokens(input_ids)

  def encode_images(self, vision: VisionInputs) -> jax.Array:
    """Merged visual tokens in image order: [B, V, D]."""
    return self.vision_features(vision)[0]

  def scatter_images(
      self,
      embeds: jax.Array,
      input_ids: jax.Array,
      image_embeds: jax.Array,
      image_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Puts the k-th visual token of row b at row b's k-th image token.

    `image_mask` bool[B, T] names the positions that receive visual tokens
    (default: every `<|image_pad|>`); responses pass the prompt's, so an
    image token the policy happens to sample stays a plain token.
    """
    slots = self.visual_slots(input_ids, image_mask)
    return jnp.where(
        slots[0][..., None], _gather(image_embeds, slots, embeds.dtype), embeds
    )

  def visual_slots(self, input_ids, image_mask=None):
    """(bool[B, T] positions holding visual tokens, int[B, T] the index of
    each one's visual token in its row)."""
    is_img = input_ids == self.config.image_token_id
    if image_mask is not None:
      is_img = jnp.asarray(image_mask).astype(jnp.bool_)
    return is_img, jnp.clip(jnp.cumsum(is_img, axis=-1) - 1, 0, None)

  def in_compute_dtype(self) -> VisionLanguageModel:
    """This model with its floating parameters stored in `dtype`.

    Every parameter is cast to `dtype` where it is used, so the copy
    computes bitwise what this model computes (a test checks). A loop that
    runs the model many times, decoding, then reads `dtype` weights once
    cast, instead of casting the float32 masters at every step: in bf16
    half the bytes per step, and half the bytes all-gathered under FSDP.
    The same model when the parameters are already in `dtype`.
    """
    graphdef, params, rest = nnx.split(self, nnx.Param, ...)

    def cast(x):
      if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != self.dtype:
        return x.astype(self.dtype)
      return x

    return nnx.merge(graphdef, jax.tree.map(cast, params), rest)

  def with_layers_unstacked(self) -> VisionLanguageModel:
    """This model with its decoder layers as L modules, each holding its
    own slice of the stacked weights (meant for inside a jitted function).

    The forward is the same, run as a Python loop over the layers. The
    sampler decodes with it: a scanned decoding step would slice (copy)
    every layer's weights out of the stack at every step, where an unstacked
    one reads them where they lie. Made before `in_compute_dtype`, the
    slices fuse with the cast, so the two together hold one compute-dtype
    copy of the decoder, as the cast alone does (when the parameters are
    already in the compute dtype, the slices are that copy).
    """
    graphdef, state = nnx.split(self)
    model = nnx.merge(graphdef, state)
    model.language_model.unstack()
    return model

  def head_weight(self) -> jax.Array:
    """The output projection as [D, vocab], in the compute dtype."""
    if self.config.text.tie_word_embeddings:
      w = self.language_model.embed_tokens.embedding[...].T
    else:
      w = self.lm_head.kernel[...]
    return w.astype(self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32[..., vocab] from final hidden states."""
    w = self.head_weight().astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w).astype(jnp.float32)

  # -------------------------------------------------------------------
  # Forward.
  # -------------------------------------------------------------------

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      attention_mask: jax.Array | None = None,
      position_ids: jax.Array | None = None,
      vision: VisionInputs | None = None,
      pixel_values: Any = None,
      image_grid_thw: Any = None,
      image_embeds: jax.Array | None = None,
      inputs_embeds: jax.Array | None = None,
      image_mask: jax.Array | None = None,
      attention_probe: AttentionProbe | None = None,
      cache: KVCache | None = None,
      cache_index: Any = 0,
      prefix_cache: KVCache | None = None,
      prefix_mask: jax.Array | None = None,
      return_logits: bool = True,
  ) -> ModelOutput:
    """Runs the model.

    Args:
      input_ids: int32[B, T].
      attention_mask: int/bool[B, S], 1 for real tokens; with a cache it
        covers all S cache slots (the new tokens included). None: all real.
      position_ids: int32[3, B, T] M-RoPE positions (see
        `inputs.rope_index`). None: computed, which needs concrete inputs
        when there are images.
      vision: fixed-shape image inputs (see `inputs.vision_inputs`).
      pixel_values: alternatively, HF's batch-packed float[n, patch_dim]
        with `image_grid_thw` int[n_images, 3] (host arrays, outside jit).
      image_grid_thw: see `pixel_values`.
      image_embeds: precomputed `vision_features` output (skips the vision
        tower): (tokens [B, V, D], DeepStack features [N, B, V, D] or
        None), or the tokens alone for a model without DeepStack.
      inputs_embeds: precomputed input embeddings [B, T, D].
      image_mask: bool[B, T], positions that receive visual tokens
        (default: the `<|image_pad|>` tokens).
      attention_probe: rows/columns of attention to return.
      cache: a KVCache to write into and attend over.
      cache_index: first cache slot of the T new tokens (a Python int, or a
        traced scalar when decoding, or int32[B], one per row: the slots of
        `faithful_rl.refill` decode at different steps).
      prefix_cache: keys and values [L, b, K, Tp, d] of a prefix shared by
        groups of B / b consecutive rows (a prompt's G sampled responses):
        every query also attends to its group's real prefix keys. The
        prefix is read once per group, never repeated. `attention_mask`,
        `cache` and the probe's key positions >= Tp then refer to each
        row's own keys; key positions < Tp to the prefix.
      prefix_mask: bool[b, Tp], the prefix keys that exist.
      return_logits: compute the float32 logits (else only hidden states).
    """
    cfg = self.config
    if pixel_values is not None and vision is None:
      if image_grid_thw is None:
        raise ValueError("pixel_values needs image_grid_thw")
      pix, grids = inputs_lib.split_hf_images(
          np.asarray(input_ids), pixel_values, image_grid_thw, cfg
      )
      if position_ids is None:
        position_ids, _ = inputs_lib.rope_index(
            np.asarray(input_ids),
            None if attention_mask is None else np.asarray(attention_mask),
            grids,
            cfg,
        )
      n = inputs_lib.bucket_patches(grids, cfg.vision)
      vision = inputs_lib.vision_inputs(pix, grids, n, cfg.vision)
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    s = t if cache is None else cache.length
    if attention_mask is None:
      attention_mask = jnp.ones((b, s), jnp.bool_)
    key_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if key_mask.shape != (b, s):
      raise ValueError(
          f"attention_mask has shape {key_mask.shape}, expected {(b, s)}"
      )
    if position_ids is None:
      if vision is not None or image_embeds is not None:
        raise ValueError(
            "position_ids are required with images inside jit; compute them"
            " with faithful_rl.models.inputs.rope_index"
        )
      if cache is not None:
        raise ValueError("position_ids are required when using a cache")
      pos = jnp.maximum(jnp.cumsum(key_mask, -1) - 1, 0) * key_mask
      position_ids = jnp.broadcast_to(pos[None], (3, b, t))
    position_ids = jnp.asarray(position_ids)

    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    deepstack = None
    if vision is not None and image_embeds is None:
      image_embeds = self.vision_features(vision)
    if image_embeds is not None:
      image_embeds, features = self._split_features(image_embeds)
      inputs_embeds = self.scatter_images(
          inputs_embeds, input_ids, image_embeds, image_mask
      )
      if features is not None:
        deepstack = (features, self.visual_slots(input_ids, image_mask))
    # [t], or [B, t] with one cache index per row (a refilled sampler).
    query_slots = jnp.asarray(cache_index, jnp.int32)[..., None] + jnp.arange(
        t, dtype=jnp.int32
    )
    if prefix_cache is not None:
      if prefix_mask is None:
        raise ValueError("prefix_cache needs prefix_mask")
      if b % prefix_cache.rows:
        raise ValueError(
            f"{b} rows do not split into groups of the prefix's"
            f" {prefix_cache.rows} rows"
        )
      prefix_mask = jnp.asarray(prefix_mask).astype(jnp.bool_)
    ctx = Context(
        key_mask=key_mask,
        query_slots=jnp.broadcast_to(query_slots, (b, t)),
        cache_index=cache_index,
        probe=attention_probe,
        impl=self.attention,
        prefix_mask=prefix_mask,
    )
    x, new_cache, visual_attention = self.decode(
        inputs_embeds, position_ids, ctx, cache, prefix_cache, deepstack
    )
    hidden = self.language_model.norm(x)
    return ModelOutput(
        logits=self.logits(hidden) if return_logits else None,
        hidden=hidden,
        visual_attention=visual_attention,
        cache=new_cache,
    )

  def _split_features(self, image_embeds):
    """`image_embeds` -> (tokens, DeepStack features or None)."""
    if isinstance(image_embeds, (tuple, list)):
      tokens, features = image_embeds
    else:
      tokens, features = image_embeds, None
    want = len(getattr(self.config.vision, "deepstack_visual_indexes", ()))
    have = 0 if features is None else features.shape[0]
    if have != want:
      raise ValueError(
          f"image_embeds carry {have} DeepStack feature levels but this"
          f" {self.config.family} model takes {want}; pass"
          " model.vision_features(vision)"
      )
    return tokens, features

  def decode(
      self,
      x,
      position_ids,
      ctx: Context,
      cache: KVCache | None,
      prefix: KVCache | None = None,
      deepstack=None,
  ):
    """The decoder layers: scanned runs between the probed layers.

    `deepstack`: (features [N, B, V, D], `visual_slots`) or None; after
    decoder layer i < N, row b's k-th visual position gets features[i, b,
    k] added (Qwen3-VL's DeepStack; only forwards that carry images).

    An unstacked model (`with_layers_unstacked`), or a per-layer cache,
    runs the layers as a Python loop; with a per-layer cache each layer
    writes its new keys into its own cache and attends over it in place.

    Returns (hidden [B, T, D] before the final norm, the updated cache (in
    the layout it came in) or None, {probed layer: attention}).
    """
    tcfg = self.config.text
    n = tcfg.num_hidden_layers
    cos, sin = layers.mrope_cos_sin(
        position_ids,
        head_dim=tcfg.rotary_dim,
        theta=tcfg.rope_theta,
        section=tcfg.mrope_section,
        dtype=x.dtype,
        interleaved=tcfg.mrope_interleaved,
    )
    probe = ctx.probe
    probed = sorted(set(probe.layers)) if probe is not None else []
    for layer_idx in probed:
      if not 0 <= layer_idx < n:
        raise ValueError(f"probe layer {layer_idx} out of range [0, {n})")
    levels = 0 if deepstack is None else deepstack[0].shape[0]
    if levels > n:
      raise ValueError(f"{levels} DeepStack levels for {n} decoder layers")
    plain = dataclasses.replace(ctx, probe=None)

    def run(layer, x, per_layer, layer_ctx):
      layer_cache, layer_prefix, features = per_layer
      x, kv, out = layer(
          layers.shard_batch(x), cos, sin, layer_ctx, layer_cache, layer_prefix
      )
      if features is not None:
        is_vis = deepstack[1][0]
        x = x + jnp.where(
            is_vis[..., None], _gather(features, deepstack[1], x.dtype), 0
        )
      return x, (kv if cache is not None else None, out)

    def per_layer(start, stop):
      """This run of layers' cache, prefix and DeepStack slices (scan xs)."""
      take = lambda c: None if c is None else (c.k[start:stop],
                                               c.v[start:stop])  # fmt: skip
      features = deepstack[0][start:stop] if stop <= levels else None
      return take(cache), take(prefix), features

    per_layer_cache = cache is not None and cache.per_layer
    if self.language_model.unstacked or per_layer_cache:
      step_ctx = dataclasses.replace(plain, write_cache=per_layer_cache)
      new_kv, visual_attention = [], {}
      for i in range(n):
        layer_ctx = dataclasses.replace(
            step_ctx, probe=probe if i in probed else None
        )
        one = lambda layer, x, xs, c=layer_ctx: run(layer, x, xs, c)
        if self.remat != "none":
          one = jax.checkpoint(one, policy=layers.remat_policy(self.remat))
        x, (kv, out) = one(
            self.language_model.layer(i),
            x,
            (
                None if cache is None else cache.layer(i),
                None if prefix is None else prefix.layer(i),
                deepstack[0][i] if i < levels else None,
            ),
        )
        new_kv.append(kv)
        if i in probed:
          visual_attention[i] = out if probe.per_head else out.mean(axis=1)
      if per_layer_cache:
        ks, vs = zip(*new_kv)
        return x, cache.with_layers(ks, vs), visual_attention
      if cache is not None:
        new_kv = [jax.tree.map(lambda a: a[None], kv) for kv in new_kv]
      return x, self._write(cache, new_kv, ctx), visual_attention

    # Runs of layers are cut at each probed layer (run alone, outside the
    # scan, with the probe) and where DeepStack stops, so that within a run
    # every layer takes the same inputs. The caches enter as per-layer
    # inputs (never as a scanned carry, which the backward pass would keep
    # once per layer); the layers return their T new keys and values,
    # written into the stacked cache once at the end.
    stack = self.language_model.layers
    cuts = {0, n, levels} | set(probed) | {p + 1 for p in probed}
    cuts = sorted(cuts)
    new_kv, visual_attention = [], {}
    for start, stop in zip(cuts[:-1], cuts[1:]):
      if start in probed:
        probed_run = lambda layer, x, xs: run(
            layer, x, jax.tree.map(lambda a: a[0], xs), ctx
        )
        if self.remat != "none":
          probed_run = jax.checkpoint(
              probed_run, policy=layers.remat_policy(self.remat)
          )
        x, (kv, out) = probed_run(
            self.language_model.layer(start), x, per_layer(start, stop)
        )
        if cache is not None:
          new_kv.append(jax.tree.map(lambda a: a[None], kv))
        visual_attention[start] = out if probe.per_head else out.mean(axis=1)
        continue
      x, ys = layers.run_stack(
          stack,
          lambda layer, x, i, xs: run(layer, x, xs, plain),
          x,
          per_layer(start, stop),
          start=start,
          stop=stop,
          remat=self.remat,
          scan=self.scan_layers,
      )
      if ys is not None and cache is not None:
        new_kv.append(ys[0])
    return x, self._write(cache, new_kv, ctx), visual_attention

  @staticmethod
  def _write(cache: KVCache | None, new_kv, ctx: Context):
    """The stacked cache with every layer's T new keys and values ([l, B,
    K, T, d] per run of l layers, in layer order) written at once."""
    if cache is None:
      return None
    k_new = jnp.concatenate([kv[0] for kv in new_kv], axis=0)
    v_new = jnp.concatenate([kv[1] for kv in new_kv], axis=0)
    at = lambda c, x: write_at(c, x, ctx.cache_index, axis=3, row_axis=1)
    return KVCache(k=at(cache.k, k_new), v=at(cache.v, v_new))


def _gather(features: jax.Array, slots, dtype) -> jax.Array:
  """[B, V, D] visual features at the [B, T] positions of `slots` (each
  position gets its visual token's row; mask with slots[0])."""
  return jnp.take_along_axis(features, slots[1][..., None], axis=1).astype(
      dtype
  )
