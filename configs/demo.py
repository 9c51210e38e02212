r"""The embedded default: synthetic evidence-VQA, a tiny Qwen2.5-VL-shaped
model trained from scratch on a CPU: SFT warm start, then DAPO, then a
held-out evaluation table (chance vs after SFT vs after RL).

  python -m faithful_rl.train --config=configs/demo.py --workdir=workdirs/demo
  python -m faithful_rl.train --config=configs/demo.py:runlocal --workdir=/tmp/d

The model: ViT 2 x 64 on 112-px images (16 merged visual tokens), decoder
4 x 128, the project's own 442-token tokenizer. Calibration (docs/design.md):
a model of this size learns colour and count questions from 0.40 to 0.72
held-out accuracy in 1000 AdamW steps of batch 64.
"""

from configs import common


def scratch_model():
  """Sizes of the tiny model (token ids come from the demo tokenizer)."""
  return dict(
      text=dict(
          vocab_size=448,
          hidden_size=128,
          intermediate_size=256,
          num_hidden_layers=4,
          num_attention_heads=4,
          num_key_value_heads=2,
          rope_theta=10000.0,
          mrope_section=(4, 6, 6),
          max_position_embeddings=512,
          tie_word_embeddings=True,
          rms_norm_eps=1e-6,
      ),
      vision=dict(
          depth=2,
          hidden_size=64,
          intermediate_size=128,
          num_heads=2,
          out_hidden_size=128,
          window_size=112,
          fullatt_block_indexes=(1,),
      ),
  )


def demo_config(runlocal: bool = False, algorithm: str = "dapo"):
  """The demo's settings; the method configs' `:demo` variants build on it."""
  c = common.base_config()
  common.set_algorithm(c, algorithm)
  c.model.init = "scratch"
  c.model.dtype = "float32"
  c.model.scratch = scratch_model()

  c.data.name = "evidence_vqa/demo"
  c.data.synthetic = dict(
      families=("attribute", "count"),
      num_train=20000,
      num_validation=512,
      num_test=512,
  )
  c.data.prompt_buckets = (56,)  # prompts are 52-53 tokens
  c.data.patch_buckets = (64,)
  c.data.response_buckets = (16, 32)

  c.stages = ("sft", "rl")
  c.sft.steps = 300
  c.sft.batch_size = 64
  c.sft.optim = dict(
      lr=1e-3, warmup_steps=50, decay="cosine", weight_decay=0.01,
      grad_clip=1.0, b2=0.98, groups=(),
  )  # fmt: skip

  c.rl.steps = 150
  c.rl.num_prompts = 32
  c.rl.gen_prompts = 32
  c.rl.max_rounds = 2
  c.rl.num_samples = 8
  c.rl.sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=32)
  c.rl.overlong_cache = 8
  c.rl.optim = dict(
      lr=1e-4, warmup_steps=10, decay="constant", weight_decay=0.0,
      grad_clip=1.0, b2=0.98, groups=(),
  )  # fmt: skip

  c.eval = dict(
      every=0, num_examples=256, batch_size=128, final_examples=512, sampled=4
  )
  c.ckpt = dict(every=100, keep=2, async_save=True)
  c.log_every = 25
  if runlocal:
    shrink(c)
  return c


def shrink(c):
  """The demo at `runlocal` size: the same task, a minute on a CPU."""
  common.runlocal(c)
  c.data.prompt_buckets = (56, 64)
  c.data.synthetic.num_train = 64
  c.data.synthetic.num_validation = 16
  c.data.synthetic.num_test = 16
  return c


def get_config(arg=None):
  """`demo` is accepted (this is the demo); `algorithm=grpo|dapo|vppo`."""
  arg = common.parse_arg(arg, runlocal=False, demo=True, algorithm="dapo")
  return demo_config(arg.runlocal, arg.algorithm)
