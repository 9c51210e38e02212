"""Tiny configs and inputs shared by the tests."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from faithful_rl.data.processing import Example
from faithful_rl.models.config import QWEN3_TEXT
from faithful_rl.models.config import ModelConfig
from faithful_rl.models.config import Qwen3VisionConfig
from faithful_rl.models.config import TextConfig
from faithful_rl.models.config import VisionConfig

IMAGE, VSTART, VEND, PAD = 120, 118, 119, 0


def tiny_config(*, tied: bool = False, window: bool = True) -> ModelConfig:
  """Window attention with several full-attention blocks (or tied head)."""
  return ModelConfig(
      text=TextConfig(
          vocab_size=128,
          hidden_size=64,
          intermediate_size=96,
          num_hidden_layers=3,
          num_attention_heads=4,
          num_key_value_heads=2,
          rope_theta=10000.0,
          mrope_section=(2, 3, 3),
          max_position_embeddings=512,
          tie_word_embeddings=tied,
          rms_norm_eps=1e-6,
      ),
      vision=VisionConfig(
          depth=4,
          hidden_size=32,
          intermediate_size=48,
          num_heads=2,
          window_size=56 if window else 112,
          out_hidden_size=64,
          fullatt_block_indexes=(1, 3) if window else (0, 1, 2, 3),
          tokens_per_second=2,
      ),
      image_token_id=IMAGE,
      video_token_id=121,
      vision_start_token_id=VSTART,
      vision_end_token_id=VEND,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=PAD,
  )


def tiny_qwen3_config(*, tied: bool = False) -> ModelConfig:
  """Qwen3-VL: 3 decoder layers (DeepStack feeds 0 and 1, not 2), head_dim
  32 != 64 / 4, a 6 x 6 position table (grids above and below it)."""
  base = tiny_config(tied=tied)
  text = base.text.replace(
      head_dim=32, rope_theta=5e6, mrope_section=(6, 5, 5), **QWEN3_TEXT
  )
  vision = Qwen3VisionConfig(
      depth=4,
      hidden_size=32,
      intermediate_size=48,
      num_heads=2,
      out_hidden_size=64,
      num_position_embeddings=36,
      deepstack_visual_indexes=(0, 2),
  )
  return base.replace(family="qwen3_vl", text=text, vision=vision)


def image_tokens(grid, merge: int = 2) -> list[int]:
  t, h, w = grid
  return [VSTART] + [IMAGE] * (t * h * w // merge**2) + [VEND]


def make_batch(rng, prompts, pad_side: str = "left"):
  """prompts: list of token lists -> (input_ids, attention_mask) padded."""
  length = max(len(p) for p in prompts)
  ids = np.full((len(prompts), length), PAD, np.int64)
  mask = np.zeros((len(prompts), length), np.int64)
  for i, p in enumerate(prompts):
    if pad_side == "left":
      ids[i, length - len(p) :] = p
      mask[i, length - len(p) :] = 1
    else:
      ids[i, : len(p)] = p
      mask[i, : len(p)] = 1
  return ids, mask


def random_text(rng, n: int) -> list[int]:
  return list(rng.integers(3, 110, size=n))


def random_pixels(rng, grids, patch_dim: int = 1176) -> np.ndarray:
  n = sum(t * h * w for t, h, w in grids)
  return rng.standard_normal((n, patch_dim)).astype(np.float32)


def image_prompts(rng, grids_per_example) -> list[list[int]]:
  """One prompt per example: text, then each image's tokens and text."""
  prompts = []
  for grids in grids_per_example:
    p = random_text(rng, 3)
    for g in grids:
      p += image_tokens(g) + random_text(rng, 2)
    prompts.append(p)
  return prompts


def hf_forward(hf, ids, mask, thw=None, pix=None, image_token=IMAGE, **kwargs):
  """A `transformers` Qwen-VL forward on numpy inputs, with the
  `mm_token_type_ids` it needs to build 3-D positions for images."""
  import torch  # pylint: disable=g-import-not-at-top

  if thw:
    kwargs.update(
        pixel_values=torch.tensor(pix),
        image_grid_thw=torch.tensor(np.asarray(thw)),
        mm_token_type_ids=torch.tensor((ids == image_token).astype(np.int64)),
    )
  with torch.no_grad():
    return hf(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs
    )


def hf_logits(hf, ids, mask, thw=None, pix=None, **kwargs) -> np.ndarray:
  return hf_forward(hf, ids, mask, thw, pix, **kwargs).logits.numpy()


def example(rng, name, grids, n_before, n_after, **fields) -> Example:
  """A processed example: random text, its images, random text.

  Uniform EASE / focus targets, no boxes, no answer unless `fields` say.
  """
  prompt = random_text(rng, n_before)
  for g in grids:
    prompt += image_tokens(g) + random_text(rng, n_after)
  v = sum(t * h * w for t, h, w in grids) // 4
  values = dict(
      id=name,
      prompt_ids=np.asarray(prompt, np.int32),
      pixel_values=random_pixels(rng, grids),
      cf_pixel_values=random_pixels(rng, grids),
      image_grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
      ease_target=np.full((v,), 1.0 / max(v, 1), np.float32),
      focus_target=np.full((v,), 1.0 / max(v, 1), np.float32),
      evidence_mask=np.zeros((v,), bool),
      has_boxes=False,
      response_ids=np.asarray([2], np.int32),
      boxes_tok=np.zeros((0, 4), np.float32),
      box_image=0,
      answer="",
      answer_type="text",
  )
  values.update(fields)
  return Example(**values)


# Qwen3-VL's image processor settings (its preprocessor_config.json): 16-px
# patches merged 2 x 2 into 32-px tokens, mean = std = 0.5; min/max pixels
# set small for CPU-sized images.
QWEN3_PREPROCESSOR = dict(
    image_processor_type="Qwen2VLImageProcessorFast",
    processor_class="Qwen3VLProcessor",
    do_convert_rgb=True,
    do_normalize=True,
    do_rescale=True,
    do_resize=True,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    merge_size=2,
    patch_size=16,
    temporal_patch_size=2,
    resample=3,
    rescale_factor=1 / 255,
    size=dict(shortest_edge=64 * 64, longest_edge=256 * 256),
)

# The shape of Qwen3-VL's chat template: a system turn only when the
# messages start with one (no default system message).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


# A published checkpoint's sampling defaults (generation_config.json), other
# than transformers' own, so that a copy is told apart from a rewrite.
GENERATION_CONFIG = dict(
    do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
    repetition_penalty=1.05,
)  # fmt: skip


def write_hf_folder(
    path: str, family: str = "qwen3_vl", seed: int = 0
) -> ModelConfig:
  """A tiny checkpoint folder of `family` as transformers writes it, with
  the demo tokenizer, the family's image processor settings and chat
  template (Qwen2.5-VL's: the demo tokenizer's) and a generation config."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from faithful_rl.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from faithful_rl.models import families  # pylint: disable=g-import-not-at-top

  demo = tok_lib.demo_tokenizer_dir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(demo, name), os.path.join(path, name))
  tok = transformers.AutoTokenizer.from_pretrained(path)
  if family == "qwen3_vl":
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    config = tiny_qwen3_config()
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
      json.dump(QWEN3_PREPROCESSOR, f, indent=2)
  else:
    config = tiny_config()
    shutil.copy(os.path.join(demo, "preprocessor_config.json"), path)
  tok.save_pretrained(path)
  ids = tok_lib.special_token_ids(tok).model_config_kwargs()
  config = config.replace(**ids).replace_text(vocab_size=448)
  torch.manual_seed(seed)
  cls = getattr(transformers, families.get(family).hf_architecture)
  cls(config.to_hf()).save_pretrained(path)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(GENERATION_CONFIG, f, indent=2)
  return config


def image_only(processor_cls, processor):
  """transformers' `processor_cls` over our processor's tokenizer and image
  processor, without its video processor (that needs torchvision)."""

  class ImageOnly(processor_cls):

    @classmethod
    def get_attributes(cls):
      return ["image_processor", "tokenizer"]

  return ImageOnly(
      image_processor=processor.image_processor,
      tokenizer=processor.tokenizer,
      chat_template=processor.tokenizer.chat_template,
  )


def final_params(workdir):
  """The last checkpoint's parameters, as host arrays by path."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    step = mngr.latest_step()
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
  leaves = jax.tree_util.tree_leaves_with_path(restored["state"]["params"])
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def check_cached_decoding(model, ids, mask, pos, vis, new, full_pos, ref):
  """Prefills `ids` into a KV cache, then decodes `new` one token a step;
  the prompt's and every step's logits must equal `ref`, the logits of one
  full forward over ids + new (positions `full_pos`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import KVCache  # pylint: disable=g-import-not-at-top

  (b, t), n = ids.shape, new.shape[1]
  cache = KVCache.zeros(model.config.text, b, t + n, jnp.float32)
  kv_mask = np.concatenate([mask, np.zeros((b, n), mask.dtype)], 1)
  out = model(
      ids,
      attention_mask=kv_mask,
      position_ids=pos,
      vision=vis,
      cache=cache,
      cache_index=0,
  )
  real = mask.astype(bool)  # padding rows attend nowhere; not compared
  np.testing.assert_allclose(out.logits[real], ref[:, :t][real], atol=1e-5)
  cache = out.cache
  for i in range(n):
    kv_mask[:, t + i] = 1
    step = model(
        new[:, i : i + 1],
        attention_mask=kv_mask,
        position_ids=full_pos[:, :, t + i : t + i + 1],
        cache=cache,
        cache_index=t + i,
    )
    cache = step.cache
    np.testing.assert_allclose(step.logits[:, 0], ref[:, t + i], atol=1e-5)


def check_rope_index(hf, ids, mask, grids, config):
  """Our 3-D M-RoPE positions and deltas equal `transformers`'; returns
  our positions [3, B, T]."""
  import torch  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import inputs  # pylint: disable=g-import-not-at-top

  thw = [g for gs in grids for g in gs]
  pos_ref, delta_ref = hf.model.get_rope_index(
      torch.tensor(ids),
      torch.tensor((ids == IMAGE).astype(np.int64)),
      torch.tensor(thw),
      attention_mask=torch.tensor(mask),
  )
  pos, delta = inputs.rope_index(ids, mask, grids, config)
  np.testing.assert_array_equal(pos, pos_ref.numpy())
  np.testing.assert_array_equal(delta, delta_ref.numpy().ravel())
  return pos


def tiny_qwen3_5_config(*, tied: bool = False) -> ModelConfig:
  """Qwen3.5: 5 hybrid layers (linear, full, linear, linear, full), head_dim
  32 with a quarter rotated, grouped DeltaNet heads (4 value heads share 2
  query/key heads), a 6 x 6 position table, no DeepStack."""
  from faithful_rl.models import hybrid  # pylint: disable=g-import-not-at-top
  from faithful_rl.models import qwen3_5  # pylint: disable=g-import-not-at-top

  base = tiny_config(tied=tied)
  lin, full = hybrid.LINEAR, hybrid.FULL
  text = hybrid.HybridTextConfig(
      vocab_size=128,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=5,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      rope_theta=5e6,
      mrope_section=(2, 1, 1),
      max_position_embeddings=512,
      tie_word_embeddings=tied,
      layer_types=(lin, full, lin, lin, full),
      partial_rotary_factor=0.25,
      linear_conv_kernel_dim=4,
      linear_key_head_dim=16,
      linear_value_head_dim=8,
      linear_num_key_heads=2,
      linear_num_value_heads=4,
  )
  vision = qwen3_5.Qwen3_5VisionConfig(
      depth=2,
      hidden_size=32,
      intermediate_size=48,
      num_heads=2,
      out_hidden_size=64,
      num_position_embeddings=36,
  )
  return base.replace(family="qwen3_5", text=text, vision=vision)
