r"""DAPO + EASE (docs/methods.md 3) on Qwen3-VL-4B/8B-Instruct with EASE's
published settings: lr 1e-6, 2 epochs, 512 prompts x n = 5 per step, max
response 1,024 tokens, lambda_attn 0.001, tau 0.5, layer floor(2L/3)
(24 of 36), clip 0.2 / 0.3, no KL, greedy evaluation; the vision tower
frozen.

  python -m faithful_rl.train \
    --config=configs/qwen3_vl_ease.py:variant=8b,hf_dir=/ckpt/Qwen3-VL-8B-Instruct,data=/data/train_with_boxes.jsonl \
    --workdir=/runs/ease_qwen3_8b
  python -m faithful_rl.train --config=configs/qwen3_vl_ease.py:demo \
    --workdir=workdirs/ease_demo        # the demo's tiny model, CPU
  python -m faithful_rl.train \
    --config=configs/qwen3_vl_ease.py:runlocal,hf_dir=/ckpt/Qwen3-VL-8B-Instruct \
    --workdir=/tmp/ease_local           # a smoke test of the checkpoint

Arguments (variant=4b|8b, default 8b; hf_dir, data, eval_data, demo,
runlocal): see configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.QWEN3_RECIPE_ARGS)
  c = common.recipe(
      arg, "dapo", family="qwen3_vl", variants=common.QWEN3_VARIANTS
  )
  c = common.ease(common.ease_paper(c, arg), arg)
  return common.sized(c, arg)
