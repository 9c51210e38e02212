r"""Builds the demo tokenizer for the synthetic evidence-VQA task.

  python scripts/make_demo_tokenizer.py [--out_dir=faithful_rl/assets/demo_tokenizer]

A byte-level BPE with Qwen2's pre-tokenizer (so any text round-trips),
trained with the `tokenizers` library until every word, number and
punctuation run of the synthetic questions, reference responses, default
system prompt and answer instruction is a single token; then Qwen2.5-VL's
chat special tokens and `<Focus>` (ids 0..8), the Qwen2.5-VL chat template,
and a `preprocessor_config.json` for 112..224-px images (patch 14, merge 2).
The output is deterministic and committed; `AutoTokenizer.from_pretrained`
loads it offline.
"""

from __future__ import annotations

import argparse
import json
import os

from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers

from faithful_rl.data import synthetic
from faithful_rl.data import tokenizer as tok_lib

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# 224 * 224 is the most pixels an image keeps; 112 * 112 the fewest.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 112 * 112,
    "max_pixels": 224 * 224,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "resample": 3,
}


def training_texts() -> list[str]:
  """Every text the demo prompts and responses are made of."""
  texts = synthetic.corpus(synthetic.SyntheticConfig(), num_examples=4000)
  texts += [
      tok_lib.DEFAULT_SYSTEM_PROMPT,
      tok_lib.DEFAULT_INSTRUCTION,
      "system\n",
      "user\n",
      "assistant\n",
      "\n",
      " ".join(synthetic.COLOURS),
      " ".join(synthetic.SHAPES + tuple(s + "s" for s in synthetic.SHAPES)),
      " ".join(synthetic.RELATIONS),
      " ".join(str(i) for i in range(10)),
  ]
  return texts


def build_tokenizer(texts: list[str]) -> Tokenizer:
  """Byte-level BPE trained to completion on `texts`, special tokens first."""
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(
          Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=4096,  # an upper bound: training stops when no pair is left
      min_frequency=1,
      special_tokens=list(tok_lib.SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def tokenizer_config() -> dict:
  added = {}
  for i, token in enumerate(tok_lib.SPECIAL_TOKENS):
    added[str(i)] = {
        "content": token,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
  return {
      "tokenizer_class": "Qwen2Tokenizer",
      "added_tokens_decoder": added,
      "bos_token": None,
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": None,
      "add_prefix_space": False,
      "clean_up_tokenization_spaces": False,
      "errors": "replace",
      "split_special_tokens": False,
      "model_max_length": 4096,
      "chat_template": tok_lib.QWEN2_5_VL_CHAT_TEMPLATE,
  }


def write(out_dir: str) -> Tokenizer:
  os.makedirs(out_dir, exist_ok=True)
  tok = build_tokenizer(training_texts())
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  for name, content in (
      ("tokenizer_config.json", tokenizer_config()),
      ("preprocessor_config.json", PREPROCESSOR_CONFIG),
  ):
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write("\n")
  return tok


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=tok_lib.demo_tokenizer_dir())
  args = parser.parse_args()
  tok = write(args.out_dir)
  print(f"wrote {args.out_dir}: vocab size {tok.get_vocab_size()}")


if __name__ == "__main__":
  main()
