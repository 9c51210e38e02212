"""The base config every experiment starts from, and shared helpers.

This file is the only source of defaults: every method switch of
docs/methods.md lives here with its default (the dataclasses in
`faithful_rl.steps` have none), and a config file overrides what it
needs and documents why.

Config arguments (`--config=configs/x.py:arg`), the same for every recipe:
  variant=SIZE    the checkpoint's size (shapes, batch sizes): 3b|7b for
                  the qwen2_5_vl_* recipes, 4b|8b for the qwen3_vl_* ones.
  hf_dir=DIR      a local Hugging Face folder to start from.
  data=FILE       training data (default: the synthetic task): JSONL,
                  .parquet or an HF `datasets` folder (`data.format`);
  eval_data=FILE  held-out data, in the same format.
  demo            the demo instead of the real recipe: the tiny model from
                  scratch on the synthetic task, SFT warm start then this
                  recipe's method; trains on a CPU in about ten minutes.
  runlocal        shrinks whatever was chosen (steps, batches, buckets,
                  data) to run on a CPU in a minute or two. Without hf_dir
                  the model is the demo's tiny one; with hf_dir it is that
                  checkpoint.
"""

import os

import ml_collections

RECIPE_ARGS = dict(
    variant="7b", hf_dir="", data="", eval_data="", demo=False, runlocal=False
)
QWEN3_RECIPE_ARGS = dict(RECIPE_ARGS, variant="8b")
# The Qwen3-VL sizes EASE's published runs (`ease_paper`) are sized for.
QWEN3_VARIANTS = ("4b", "8b")


def parse_arg(arg: str | None, **defaults):
  """'variant=7b,runlocal' -> ConfigDict(variant='7b', runlocal=True, ...).

  Every key must be one of `defaults`: a misspelled argument is an error
  that names it. A bare key sets a boolean to True.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in (arg or "").split(","):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if key not in defaults:
      raise ValueError(
          f"unknown config argument {key!r} in {arg!r}; this config takes"
          f" {sorted(defaults)}"
      )
    default = defaults[key]
    if isinstance(default, bool):
      if not eq:
        out[key] = True
      elif value.lower() in ("1", "true", "yes"):
        out[key] = True
      elif value.lower() in ("0", "false", "no"):
        out[key] = False
      else:
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
    elif not eq:
      raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
    elif isinstance(default, int):
      out[key] = int(value)
    else:
      out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  # Several processes: jax.distributed.initialize(...); empty values are
  # left to JAX's cluster detection (SLURM, TPU pods, ...).
  c.distributed = dict(
      enabled=False, coordinator_address="", num_processes=0, process_id=-1
  )

  # ---- Model: a local HF folder, or a tiny model from scratch. ----
  c.model = ml_collections.ConfigDict()
  c.model.init = "hf"  # 'hf' (from_pretrained) | 'scratch'
  c.model.hf_dir = ""
  c.model.arch = ""  # a name in faithful_rl.models.archs (shapes only)
  c.model.dtype = "bfloat16"  # compute dtype (activations, matmuls, cache)
  c.model.param_dtype = "float32"  # parameters and optimizer state
  c.model.remat = "none"  # none | full | dots: what a layer keeps for bwd
  c.model.attention = "auto"  # auto|xla|flash|splash|cudnn (docs/models.md)
  c.model.scan_layers = True  # one scanned layer (False: unrolled loop)
  c.model.scratch = ml_collections.ConfigDict()  # TextConfig/VisionConfig
  c.model.init_from = ""  # a workdir: start from its parameters
  c.model.init_step = -1  # ... of this step (-1: its latest checkpoint)

  # ---- Data. ----
  c.data = ml_collections.ConfigDict()
  c.data.name = "evidence_vqa"  # TFDS name: evidence_vqa[/cfg], jsonl_vqa/x
  c.data.data_dir = ""  # default: <workdir>/../tfds, built on first use
  # jsonl_vqa/x: users' files, split -> path, in a format by name
  # (`faithful_rl.data.formats`: jsonl | parquet | hf | registered).
  c.data.files = ml_collections.ConfigDict()
  c.data.format = "jsonl"
  c.data.synthetic = ml_collections.ConfigDict()  # EvidenceVqaConfig knobs
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.test_split = "test"
  c.data.prompt_buckets = (64, 128, 256)
  c.data.patch_buckets = (64, 256, 1024)
  c.data.response_buckets = (32, 64, 128)
  c.data.on_overflow = "skip"  # 'error' names the record and stops
  c.data.num_threads = 0
  c.data.processor = ml_collections.ConfigDict(
      dict(
          instruction="Put the final answer in \\boxed{}.",
          focus_token=False,
          sigma_scale=0.25,  # EASE sigma = 0.25 * box side
          ease_alpha=0.1,  # EASE uniform mixing
          focus_alpha=0.0,  # Faithful-MR1 focus target smoothing
          counterfactual_fill="mean",  # [open] mean | black | gray | blur
      )
  )

  # ---- Stages, run in order; steps are global across stages. ----
  c.stages = ("rl",)

  # ---- SFT (and Faithful-MR1 Anchoring). ----
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0
  c.sft.batch_size = 64
  c.sft.micro_batch = 64  # rows per gradient micro-batch (accumulated)
  c.sft.optim = dict(
      lr=1e-5, warmup_steps=10, decay="cosine", weight_decay=0.0,
      grad_clip=1.0, b2=0.999, groups=(),
  )  # fmt: skip
  c.sft.anchor = dict(
      enabled=False, weight=0.1, layers=(), renormalize=True,
      direction="target_to_model",
  )  # fmt: skip

  # ---- RL. ----
  c.rl = ml_collections.ConfigDict()
  c.rl.loss = "dapo"  # a policy loss by name: grpo | dapo | ppo | registered
  c.rl.steps = 0
  c.rl.num_prompts = 32  # prompts per training batch (B)
  c.rl.num_samples = 8  # G
  c.rl.ppo_epochs = 1
  c.rl.num_minibatches = 1
  # Memory bounds, in rows (responses); each a multiple of G or a divisor.
  c.rl.rollout_chunk = 256  # rows per sampling call (over all processes)
  c.rl.analysis_chunk = 256  # rows per analysis / reference-log-prob chunk
  c.rl.micro_batch = 256  # rows per gradient micro-batch (accumulated)
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.28
  c.rl.clip_ratio_c = 3.0  # dual clip (verl, VPPO); 0 turns it off
  c.rl.aggregation = "token-mean"
  c.rl.kl_beta = 0.0
  # The PPO ratio's old log-probs: 'sampler' (the rollout's own) or
  # 'recompute' (the training forward over the batch, one more forward).
  c.rl.old_logp = "sampler"
  c.rl.std_mode = "sample"  # [open] group std: sample (verl) | population
  c.rl.scale_advantages = True  # False: Dr.GRPO (no std division)
  c.rl.dynamic_sampling = True
  c.rl.gen_prompts = 32  # prompts per generation round
  c.rl.max_rounds = 3
  c.rl.overlong = "shaping"  # shaping | filter | none
  c.rl.overlong_cache = 8  # L_cache (tokens)
  # The reward: these terms by name (`faithful_rl.rewards.REWARDS`; a new
  # one registers itself), each times its weight (default 1), each given
  # its `reward_options.<name>` block as keyword arguments.
  c.rl.rewards = ("correct", "format", "overlong")
  c.rl.reward_weights = dict(format=0.0)
  c.rl.reward_options = ml_collections.ConfigDict()
  c.rl.boxed_only = True  # only a \boxed{} answer earns the reward
  c.rl.sampling = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=64)
  c.rl.optim = dict(
      lr=1e-6, warmup_steps=10, decay="constant", weight_decay=0.1,
      grad_clip=1.0, b2=0.999, groups=(),
  )  # fmt: skip
  c.rl.ease = dict(
      enabled=False, loss="ease", weight=0.001, tau=0.5, gate=True,
      layers=(), num_queries=64, renormalize=True,
      direction="target_to_model", no_box="uniform",
  )  # fmt: skip
  c.rl.reinforce = dict(
      enabled=False, lambda_attn=0.1, test="logprob_drop", margin=0.0,
      layers=(), num_queries=64,
  )  # fmt: skip
  c.rl.vppo = dict(enabled=False, drop_prob=0.5, topk=0.4, beta_min=0.9)

  # ---- Evaluation, logging, checkpoints. ----
  c.eval = dict(
      every=100, num_examples=256, batch_size=64, final_examples=0, sampled=0
  )
  c.log_every = 10
  c.ckpt = dict(every=100, keep=2, async_save=True)
  # Weights & Biases (optional, `pip install wandb`): on when a project is
  # named; metrics also go to metrics.jsonl and TensorBoard as always.
  c.wandb = dict(project="", entity="", name="", mode="")
  c.debug = dict(nan_at_step=-1)  # fault injection for tests
  return c


def set_algorithm(c, algorithm: str):
  """GRPO / DAPO / VPPO defaults (docs/methods.md 1, 2, 5).

  Sets the policy loss by name (`rl.loss`) and the settings that go with
  it; VPPO is DAPO's loss plus its analysis pass (`rl.vppo`).
  """
  c.rl.loss = "grpo" if algorithm == "grpo" else "dapo"
  if algorithm == "grpo":
    c.rl.clip_low, c.rl.clip_high = 0.2, 0.2
    c.rl.aggregation = "seq-mean-token-mean"
    c.rl.kl_beta = 0.04
    c.rl.dynamic_sampling = False
    c.rl.overlong = "none"
  elif algorithm in ("dapo", "vppo"):
    c.rl.clip_low, c.rl.clip_high = 0.2, 0.28
    c.rl.aggregation = "token-mean"
    c.rl.kl_beta = 0.0
    c.rl.dynamic_sampling = True
    c.rl.overlong = "shaping"
    c.rl.vppo.enabled = algorithm == "vppo"
  else:
    raise ValueError(f"unknown algorithm {algorithm!r}")
  return c


def recipe(
    arg, algorithm: str, stages=("rl",), family="qwen2_5_vl", variants=None
):
  """The base of a recipe file: the demo, or the real recipe of `family`
  (a registered model family) at `arg.variant`, one of `variants`
  (default: the family's sizes in `faithful_rl.models.archs`).

  `arg` as `parse_arg(arg, **RECIPE_ARGS)` makes it. The file then sets its
  method's switches and returns `sized(c, arg)`.
  """
  if arg.demo:
    from configs import demo  # pylint: disable=g-import-not-at-top

    if arg.hf_dir or arg.data:
      raise ValueError("demo trains the tiny model on synthetic data; drop"
                       " hf_dir / data, or drop demo")  # fmt: skip
    return demo.demo_config(algorithm=algorithm)
  c = base_config()
  set_algorithm(c, algorithm)
  c.stages = tuple(stages)
  return real_checkpoint(c, arg, family, variants)


def sized(c, arg):
  """Applies `runlocal` last, so it shrinks the recipe's own settings."""
  if not arg.runlocal:
    return c
  if arg.demo:
    from configs import demo  # pylint: disable=g-import-not-at-top

    return demo.shrink(c)
  if arg.hf_dir:
    runlocal_checkpoint(c)
  else:
    tiny_model(c)
  return runlocal(c)


def data_format(path: str) -> str:
  """The `data.format` a recipe's data=FILE implies: parquet for .parquet,
  hf for a folder, else jsonl."""
  if path.endswith(".parquet"):
    return "parquet"
  return "hf" if os.path.isdir(path) else "jsonl"


def real_checkpoint(c, arg, family: str, variants=None):
  """Settings shared by the real-checkpoint recipes of every family.

  `arg`: variant (one of `variants`, default the family's sizes in
  `archs`), hf_dir=<local HF folder>, data=<train.jsonl>,
  eval_data=<eval.jsonl>; without data, the synthetic task at 112-224 px.
  The images' token side and the patch buckets are the family's
  (`faithful_rl.models.families`).
  """
  from faithful_rl.models import archs  # pylint: disable=g-import-not-at-top
  from faithful_rl.models import families  # pylint: disable=g-import-not-at-top

  variants = variants or archs.variants(family)
  if arg.variant not in variants:
    raise ValueError(
        f"variant must be {' or '.join(variants)}, not {arg.variant!r}"
    )
  arch = archs.get(f"{family}_{arg.variant}")
  c.model.init = "hf"
  c.model.arch = f"{family}_{arg.variant}"
  c.model.hf_dir = arg.hf_dir
  c.model.dtype = "bfloat16"
  c.data.name = "jsonl_vqa/user" if arg.data else "evidence_vqa/mixed_sizes"
  if arg.data:
    c.data.files = {"train": arg.data}
    c.data.format = data_format(arg.data)
    if arg.eval_data:
      c.data.files["validation"] = arg.eval_data
      c.data.files["test"] = arg.eval_data
  c.data.prompt_buckets = (512, 1024, 2048)
  c.data.patch_buckets = families.get(family).patch_buckets
  c.data.response_buckets = (256, 512, 1024)
  token_px = arch.vision.token_pixels  # the side of one merged token
  c.data.processor.max_pixels = 1280 * token_px**2  # 1,280 tokens
  c.model.remat = "full"  # benchmarks/memory.py: what makes the recipes fit
  # In bf16 the sampler's log-probs are 0.03 nats per token off the
  # training forward's (3B, H200, docs/models.md): recompute them.
  c.rl.old_logp = "recompute"
  c.rl.num_prompts = 256 if arg.variant == "3b" else 512
  c.rl.gen_prompts = 3 * c.rl.num_prompts
  c.rl.max_rounds = 10
  c.rl.num_samples = 16
  c.rl.num_minibatches = 16
  # Rows per gradient micro-batch and per sampling call, sized by
  # `python benchmarks/memory.py` for 8 x 80 GiB (fsdp=8) with >= 15%
  # headroom: 16 (7B) / 32 (3B) rows and 256 sequences per device. The
  # forward-only analysis takes micro-batches too; SFT rows (whole prompt +
  # response sequences) one per device.
  c.rl.micro_batch = 256 if arg.variant == "3b" else 128
  c.rl.analysis_chunk = c.rl.micro_batch
  # The rollout gathers the bf16 weights once per call (gather_weights
  # below), so the 7B's whole copy sits beside its KV cache: 1,024
  # sequences per call (50.4 GiB per device).
  c.rl.rollout_chunk = 2048 if arg.variant == "3b" else 1024
  c.sft.micro_batch = 8
  # gather_weights: the rollout gathers the FSDP-sharded bf16 weights once
  # per call; left sharded, every decoding step would all-gather them.
  c.rl.sampling = dict(
      temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=1024,
      gather_weights=True,
  )  # fmt: skip
  c.rl.overlong_cache = 256
  c.rl.optim.lr = 1e-6
  c.rl.optim.warmup_steps = 10
  c.rl.optim.weight_decay = 0.1
  c.rl.optim.groups = ((r"^visual/", 0.0),)  # the vision tower is frozen
  c.rl.steps = 200
  c.eval = dict(
      every=25, num_examples=512, batch_size=64, final_examples=0, sampled=0
  )
  c.ckpt = dict(every=25, keep=3, async_save=True)
  return c


def ease(c, arg):
  """EASE's switches (docs/methods.md 3) on a DAPO recipe: KL(target ||
  attention) at layer floor(2L/3) over K = 64 response rows, gated at
  reward >= tau = 0.5, weight lambda_attn = 0.001; EASE's runs clip at
  0.2 / 0.3."""
  if not arg.demo:
    c.rl.clip_high = 0.3
  c.rl.ease.enabled = True
  c.rl.ease.weight = 0.001
  c.rl.ease.tau = 0.5
  c.rl.ease.num_queries = 64
  c.rl.ease.layers = ()  # () is floor(2L/3)
  return c


def ease_paper(c, arg):
  """EASE's published Qwen3-VL-4B/8B runs, its DAPO baseline and EASE
  alike: lr 1e-6, rollout batch 512 prompts x n = 5, max response 1,024,
  clip 0.2 / 0.3, no KL, greedy evaluation, 2 epochs of its ~128K
  box-annotated questions (2 x 128K / 512 = 500 steps; set rl.steps for
  other data). Micro-batch and rollout chunk: `benchmarks/memory.py`
  (8 x 80 GiB, fsdp=8, >= 15% headroom)."""
  if arg.demo:
    return c
  c.rl.num_prompts = 512
  c.rl.gen_prompts = 3 * c.rl.num_prompts  # dynamic sampling's draws
  c.rl.num_samples = 5
  c.rl.clip_low, c.rl.clip_high = 0.2, 0.3
  c.rl.kl_beta = 0.0
  c.rl.sampling.max_new_tokens = 1024
  c.rl.optim.lr = 1e-6
  c.rl.steps = 500
  c.eval.sampled = 0  # greedy accuracy only
  # 512 x 5 / 16 minibatches = 160 rows each, in micro-batches of 80
  # (10 per device); 640 sequences (80 per device) per sampling call.
  # 8B: update 56.4 GiB, rollout 64.2 GiB per device (4B: 35.0, 46.0).
  c.rl.micro_batch = 80
  c.rl.analysis_chunk = 80
  c.rl.rollout_chunk = 640
  # Every size gathers the weights once per call (the common setting): with
  # the sampler's unstacked layers and per-layer caches, the 8B's gathered
  # rollout fits beside 640 sequences' caches (64.2 GiB; it took 85.3 when
  # decoding scanned the stack, and the recipe then gathered every layer at
  # every step instead).
  return c


# The synthetic task at runlocal size: colour and count questions.
SMALL_SYNTHETIC = dict(
    families=("attribute", "count"), num_train=64, num_validation=16,
    num_test=16,
)  # fmt: skip


def tiny_model(c):
  """The demo's tiny from-scratch model and synthetic task (CPU scale)."""
  from configs import demo  # pylint: disable=g-import-not-at-top

  c.model.init = "scratch"
  c.model.hf_dir = ""
  c.model.arch = ""
  c.model.scratch = demo.scratch_model()
  c.data.name = "evidence_vqa/demo"
  c.data.files = {}
  c.data.synthetic = dict(SMALL_SYNTHETIC)
  c.data.processor.max_pixels = None
  c.rl.optim.groups = ()
  return c


def runlocal_checkpoint(c):
  """A real checkpoint at small images and buckets (a smoke test)."""
  c.data.processor.max_pixels = 224 * 224
  c.data.processor.min_pixels = 56 * 56
  if not c.data.files:
    c.data.name = "evidence_vqa/demo"
    c.data.synthetic = dict(SMALL_SYNTHETIC)
  return c


def runlocal(c):
  """Shrinks anything to run on a laptop CPU in a minute or two."""
  c.model.dtype = "float32"
  tiny = c.model.init == "scratch"
  c.data.prompt_buckets = (64, 128) if tiny else (128, 256)
  c.data.patch_buckets = (64, 256)
  c.data.response_buckets = (16, 32)
  c.sft.steps = min(c.sft.steps, 4) if c.sft.steps else 0
  c.sft.batch_size = 4
  c.sft.micro_batch = 2
  c.rl.steps = min(c.rl.steps, 2)
  c.rl.num_prompts = 4
  c.rl.gen_prompts = 4
  c.rl.max_rounds = 2
  c.rl.num_samples = 4
  c.rl.num_minibatches = 1
  c.rl.rollout_chunk = 8
  c.rl.analysis_chunk = 8
  c.rl.micro_batch = 8
  c.rl.sampling.max_new_tokens = 16
  c.rl.overlong_cache = 4
  c.eval = dict(
      every=2, num_examples=8, batch_size=8, final_examples=8, sampled=2
  )
  c.ckpt = dict(every=2, keep=2, async_save=False)
  c.log_every = 1
  return c
