"""Adding <Focus> to a checkpoint: mean-initialised rows, HF round trip."""

import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoTokenizer

from faithful_rl import models
from faithful_rl.data import tokenizer as tok_lib
from faithful_rl.models import vocab
import helpers


def test_add_focus_grows_and_mean_initialises(tmp_path):
  tok = AutoTokenizer.from_pretrained(tok_lib.demo_tokenizer_dir())
  tok_len = len(tok)
  config = helpers.tiny_config().replace_text(vocab_size=tok_len)
  model = models.create(config, seed=2)
  emb = np.asarray(model.language_model.embed_tokens.embedding[...])
  model2, tok2, ids = vocab.add_tokens(model, tok, ["<Focus>", "<Look>"])
  assert ids[0] == tok.convert_tokens_to_ids("<Focus>") < tok_len  # existed
  assert ids[1] == tok_len and len(tok2) == tok_len + 1
  emb2 = np.asarray(model2.language_model.embed_tokens.embedding[...])
  assert emb2.shape == (tok_len + 1, emb.shape[1])
  np.testing.assert_array_equal(emb2[:tok_len], emb)  # old rows untouched
  np.testing.assert_allclose(emb2[ids[1]], emb[:tok_len].mean(0), atol=1e-6)
  head2 = np.asarray(model2.lm_head.kernel[...])
  head = np.asarray(model.lm_head.kernel[...])
  np.testing.assert_allclose(head2[:, ids[1]], head.mean(1), atol=1e-6)
  assert model2.config.text.vocab_size == tok_len + 1
  # Saved back, transformers loads it and agrees on the new token's logits.
  models.save_pretrained(model2, str(tmp_path), dtype=None)
  from transformers import Qwen2_5_VLForConditionalGeneration

  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids_in = np.array([[5, 9, ids[1], 12]])
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids_in)).logits.numpy()
  ours = np.asarray(model2(jnp.asarray(ids_in)).logits)
  np.testing.assert_allclose(ours, ref, atol=1e-4)
