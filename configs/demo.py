r"""The embedded default: synthetic evidence-VQA, a tiny Qwen2.5-VL-shaped
model trained from scratch on a CPU: SFT warm start, then DAPO, then a
held-out evaluation table (chance vs after SFT vs after RL).

  python -m faithful_rl.train --config=configs/demo.py --workdir=workdirs/demo
  python -m faithful_rl.train --config=configs/demo.py:runlocal --workdir=/tmp/d

The model: ViT 2 x 64 on 168-px images (6 x 6 = 36 merged visual tokens of
28 px), decoder 4 x 128, the project's own 442-token tokenizer. The task:
colour questions ("What colour is the circle?") on the prior-shortcut
variant of `evidence_vqa`: each shape has a usual colour, true on half of
the training images (`prior=0.5`); the held-out table is the `test` split,
where colours are uniform (chance 0.2).

What makes RL visibly help (experiments/README.md has the runs):
* An imperfect demonstrator. On half of the training images whose colour
  is not the usual one, the SFT reference states the usual colour anyway
  (`reference_prior=0.5`), as a demonstrator leaning on a language prior
  would. SFT imitates it: after 200 steps greedy decoding mostly answers
  the usual colour (held-out greedy accuracy near chance). The verifier
  rewards the true colour, so DAPO moves probability from the prior's
  answer to the one the image shows: greedy 0.24 -> 0.49 on seed 0.
* A short SFT stage (200 steps of 32) and a high RL learning rate (3e-4,
  16 prompts x 8 samples, 60 steps): the RL stage must move a lot in a
  few steps to fit the time budget.
* References are the boxed answer alone (`reference_style="answer"`).
  With a sentence of reasoning before the answer, DAPO at a learning rate
  that moves anything (2e-4 and up) learned to drop the sentence and
  greedy decoding broke the format. Short responses also keep sampling
  cheap (16 new tokens at most).
* 168-px images: at 112 px (4 x 4 tokens) an object often falls inside
  one 28-px token; the attention heatmaps need a finer grid.
"""

from configs import common


def scratch_model(window_size: int = 112):
  """Sizes of the tiny model (token ids come from the demo tokenizer).

  `window_size`: the vision tower's attention window in pixels; the demo's
  168 makes one window of its 168-px images (6 x 6 merged tokens). The
  recipes' runlocal model keeps 112 (their 112-px images, 64-patch
  buckets).
  """
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
          window_size=window_size,
          fullatt_block_indexes=(1,),
      ),
  )


def demo_config(runlocal: bool = False, algorithm: str = "dapo"):
  """The demo's settings; the method configs' `:demo` variants build on it."""
  c = common.base_config()
  common.set_algorithm(c, algorithm)
  c.model.init = "scratch"
  c.model.dtype = "float32"
  c.model.scratch = scratch_model(window_size=168)

  c.data.name = "evidence_vqa/demo"
  c.data.synthetic = dict(
      families=("attribute",),  # "What colour is the <shape>?"
      image_sizes=((168, 168),),
      reference_style="answer",  # "\\boxed{red}"
      prior=0.5,  # each shape has a usual colour, true on half of train
      reference_prior=0.5,  # the demonstrator's language-prior habit
      num_train=8000,
      num_validation=256,
      num_test=512,
  )
  # No system turn: prompts are 66-67 tokens, 36 of them visual.
  c.data.processor.system_prompt = ""
  c.data.prompt_buckets = (68,)
  c.data.patch_buckets = (144,)
  c.data.response_buckets = (8, 16)  # responses are 5-6 tokens

  c.stages = ("sft", "rl")
  c.sft.steps = 200
  c.sft.batch_size = 32
  c.sft.micro_batch = 32
  c.sft.optim = dict(
      lr=1e-3, warmup_steps=20, decay="cosine", weight_decay=0.01,
      grad_clip=1.0, b2=0.98, groups=(),
  )  # fmt: skip

  c.rl.steps = 60
  c.rl.num_prompts = 16
  c.rl.gen_prompts = 16
  c.rl.max_rounds = 2
  c.rl.num_samples = 8
  c.rl.rollout_chunk = 128
  c.rl.analysis_chunk = 128
  c.rl.micro_batch = 128
  c.rl.sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16)
  c.rl.overlong_cache = 4
  c.rl.optim = dict(
      lr=3e-4, warmup_steps=5, decay="constant", weight_decay=0.0,
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
  """The demo at `runlocal` size: the same task, a minute on a CPU.

  Images shrink to 112 px (4 x 4 visual tokens, one 112-px window) and the
  buckets to `common.runlocal`'s.
  """
  common.runlocal(c)
  c.model.scratch.vision.window_size = 112
  c.data.synthetic.image_sizes = ((112, 112),)
  c.data.synthetic.num_train = 64
  c.data.synthetic.num_validation = 16
  c.data.synthetic.num_test = 16
  return c


def get_config(arg=None):
  """`demo` is accepted (this is the demo); `algorithm=grpo|dapo|vppo`."""
  arg = common.parse_arg(arg, runlocal=False, demo=True, algorithm="dapo")
  return demo_config(arg.runlocal, arg.algorithm)
