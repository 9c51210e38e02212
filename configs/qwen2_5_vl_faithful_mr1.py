r"""Faithful-MR1 (docs/methods.md 4): Anchoring, then Reinforcing.

Anchoring (SFT stage): every response starts with `<Focus>`; the attention
row of that token over the visual tokens (heads averaged, at the probed
layer) is pulled toward the uniform distribution over the tokens covered
by the evidence boxes: L = CE + 0.1 * KL(focus target || row).
Reinforcing (RL stage, DAPO base): a trajectory that is correct and whose
answer depends on the evidence (its log-prob drops when the evidence is
masked out of the image: 'logprob_drop'; or its counterfactual rollout is
wrong: 'rollout_flip') earns 0.1 * (its attention mass on the evidence).

A real checkpoint needs the token first:
  python -m faithful_rl.models.vocab /ckpt/Qwen2.5-VL-3B-Instruct /ckpt/qwen3b_focus
  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_faithful_mr1.py:variant=3b,hf_dir=/ckpt/qwen3b_focus,data=/data/train_with_boxes.jsonl \
    --workdir=/runs/mr1_3b
The demo tokenizer has `<Focus>` already:
  python -m faithful_rl.train --config=configs/qwen2_5_vl_faithful_mr1.py:demo \
    --workdir=workdirs/mr1_demo
  python -m faithful_rl.train \
    --config=configs/qwen2_5_vl_faithful_mr1.py:runlocal --workdir=/tmp/mr1

Switches: --config.data.processor.counterfactual_fill=black|gray|blur,
--config.rl.reinforce.test=rollout_flip, --config.rl.reinforce.lambda_attn,
--config.sft.anchor.weight, --config.data.processor.focus_alpha (smoothing).

Arguments (variant, hf_dir, data, eval_data, demo, runlocal): see
configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.RECIPE_ARGS)
  c = common.recipe(arg, "dapo", stages=("sft", "rl"))
  if not arg.demo:
    c.sft.steps = 500
    c.sft.batch_size = 64
  c.data.processor.focus_token = True
  c.data.processor.counterfactual_fill = "mean"
  c.sft.anchor = dict(
      enabled=True, weight=0.1, layers=(), renormalize=True,
      direction="target_to_model",
  )  # fmt: skip
  c.rl.reinforce = dict(
      enabled=True, lambda_attn=0.1, test="logprob_drop", margin=0.0,
      layers=(), num_queries=64,
  )  # fmt: skip
  return common.sized(c, arg)
