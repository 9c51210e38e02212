"""Tokenizer helpers: Qwen's special tokens, chat template, demo tokenizer.

The demo tokenizer (`demo_tokenizer_dir()`) is a byte-level BPE of a few
hundred tokens built by `scripts/make_demo_tokenizer.py` for the synthetic
task, with Qwen2.5-VL's chat special tokens, `<Focus>` and the Qwen2.5-VL
chat template; `transformers.AutoTokenizer.from_pretrained` loads it
offline. Its `special_token_ids` are the ids the demo model config uses.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

FOCUS_TOKEN = "<Focus>"

# Qwen2.5-VL's special tokens, in the order the demo tokenizer gives them
# ids 0, 1, ...; `<Focus>` (Faithful-MR1's anchoring token) comes last.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    FOCUS_TOKEN,
)

# The chat template of the published Qwen2.5-VL-Instruct checkpoints.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count ="
    " namespace(value=0) %}{% for message in messages %}{% if loop.first and"
    " message['role'] != 'system' %}<|im_start|>system\nYou are a helpful"
    " assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role']"
    " }}\n{% if message['content'] is string %}{{ message['content']"
    " }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if"
    " content['type'] == 'image' or 'image' in content or 'image_url' in"
    " content %}{% set image_count.value = image_count.value + 1 %}{% if"
    " add_vision_id %}Picture {{ image_count.value }}: {% endif"
    " %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] =="
    " 'video' or 'video' in content %}{% set video_count.value ="
    " video_count.value + 1 %}{% if add_vision_id %}Video {{"
    " video_count.value }}: {% endif"
    " %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content"
    " %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{%"
    " endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif"
    " %}"
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_INSTRUCTION = "Put the final answer in \\boxed{}."


def demo_tokenizer_dir() -> str:
  """Path of the committed demo tokenizer (tokenizer + preprocessor files)."""
  return os.path.join(
      os.path.dirname(os.path.dirname(__file__)), "assets", "demo_tokenizer"
  )


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """Ids of the chat and vision special tokens of a tokenizer.

  `focus` is None when the tokenizer has no `<Focus>` token.
  """

  endoftext: int
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int
  pad: int
  focus: int | None = None

  def model_config_kwargs(self) -> dict[str, Any]:
    """Token-id fields of `faithful_rl.models.ModelConfig` for this vocab."""
    return dict(
        image_token_id=self.image_pad,
        video_token_id=self.video_pad,
        vision_start_token_id=self.vision_start,
        vision_end_token_id=self.vision_end,
        bos_token_id=self.endoftext,
        eos_token_id=self.im_end,
        pad_token_id=self.pad,
    )


def _token_id(tokenizer, token: str, required: bool = True) -> int | None:
  vocab = tokenizer.get_vocab()
  if token in vocab:
    return int(vocab[token])
  if required:
    raise ValueError(
        f"the tokenizer has no {token!r} token (a Qwen2.5-VL tokenizer is"
        " expected)"
    )
  return None


def special_token_ids(tokenizer) -> SpecialTokenIds:
  """The `SpecialTokenIds` of a `transformers` tokenizer.

  The pad id is the tokenizer's pad token, else `<|endoftext|>` (Qwen's).
  """
  eot = _token_id(tokenizer, "<|endoftext|>")
  pad = getattr(tokenizer, "pad_token_id", None)
  return SpecialTokenIds(
      endoftext=eot,
      im_start=_token_id(tokenizer, "<|im_start|>"),
      im_end=_token_id(tokenizer, "<|im_end|>"),
      vision_start=_token_id(tokenizer, "<|vision_start|>"),
      vision_end=_token_id(tokenizer, "<|vision_end|>"),
      image_pad=_token_id(tokenizer, "<|image_pad|>"),
      video_pad=_token_id(tokenizer, "<|video_pad|>"),
      pad=eot if pad is None else int(pad),
      focus=_token_id(tokenizer, FOCUS_TOKEN, required=False),
  )
