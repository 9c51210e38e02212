"""Growing a checkpoint's vocabulary, e.g. Faithful-MR1's `<Focus>` token.

  python -m faithful_rl.models.vocab /ckpt/Qwen2.5-VL-3B-Instruct /ckpt/with_focus

adds `<Focus>` as a special token to the tokenizer, grows the embedding
(and the untied LM head) to cover it, initialises each new row with the
mean of the existing rows (METHODS 4), and writes a HF folder that both
`faithful_rl` and `transformers` load. Published Qwen checkpoints have
spare rows (vocab_size > len(tokenizer)); a new token then takes a spare
row's id, and the spare row is re-initialised to the mean.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

FOCUS = "<Focus>"


def add_tokens(model, tokenizer, tokens: Sequence[str] = (FOCUS,)):
  """Adds special tokens; returns (model, tokenizer, new ids).

  The model is rebuilt with `vocab_size = max(vocab_size, len(tokenizer))`
  and every new token's embedding row (and head column when untied) is the
  mean over the rows of the tokens that existed before.
  """
  old_len = len(tokenizer)
  new = [t for t in tokens if t not in tokenizer.get_vocab()]
  if new:
    tokenizer.add_special_tokens({"additional_special_tokens": new})
  ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
  cfg = model.config
  vocab = max(cfg.text.vocab_size, len(tokenizer))
  emb = model.language_model.embed_tokens.embedding[...]
  mean_emb = emb[:old_len].astype(jnp.float32).mean(0).astype(emb.dtype)
  grown = (
      jnp.zeros((vocab, emb.shape[1]), emb.dtype).at[: emb.shape[0]].set(emb)
  )
  new_ids = [i for i, t in zip(ids, tokens) if t in new]
  for i in new_ids:
    grown = grown.at[i].set(mean_emb)
  new_cfg = dataclasses.replace(
      cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab)
  )
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  pure["language_model"]["embed_tokens"]["embedding"] = grown
  if not cfg.text.tie_word_embeddings:
    head = pure["lm_head"]["kernel"]
    mean_head = head[:, :old_len].astype(jnp.float32).mean(1)
    g = jnp.zeros((head.shape[0], vocab), head.dtype)
    g = g.at[:, : head.shape[1]].set(head)
    for i in new_ids:
      g = g.at[:, i].set(mean_head.astype(head.dtype))
    pure["lm_head"]["kernel"] = g
  from faithful_rl.models import convert_hf  # pylint: disable=g-import-not-at-top

  abstract = convert_hf.abstract_model(
      new_cfg, model.dtype, **convert_hf.options_of(model)
  )
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, pure), tokenizer, ids


def main(argv=None):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from faithful_rl.models import convert_hf  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description="Add <Focus> to a checkpoint.")
  parser.add_argument("hf_dir")
  parser.add_argument("out_dir")
  parser.add_argument("--tokens", default=FOCUS, help="comma-separated")
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args(argv)
  model = convert_hf.from_pretrained(args.hf_dir, jnp.dtype(args.dtype))
  tok = AutoTokenizer.from_pretrained(args.hf_dir)
  model, tok, ids = add_tokens(model, tok, args.tokens.split(","))
  convert_hf.save_pretrained(
      model,
      args.out_dir,
      dtype=jnp.dtype(args.dtype),
      copy_files_from=args.hf_dir,
  )
  tok.save_pretrained(args.out_dir)
  print(f"wrote {args.out_dir}: {dict(zip(args.tokens.split(','), ids))}")


if __name__ == "__main__":
  main()
