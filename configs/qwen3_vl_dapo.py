r"""DAPO on Qwen3-VL-4B/8B-Instruct: EASE's baseline, the EASE recipe
without the attention term (lr 1e-6, 2 epochs, 512 prompts x n = 5, max
response 1,024, clip 0.2 / 0.3, token-mean, dual clip, dynamic sampling,
overlong shaping, no KL, greedy evaluation, frozen vision tower).

  python -m faithful_rl.train \
    --config=configs/qwen3_vl_dapo.py:variant=8b,hf_dir=/ckpt/Qwen3-VL-8B-Instruct,data=/data/train.jsonl,eval_data=/data/val.jsonl \
    --workdir=/runs/dapo_qwen3_8b
  python -m faithful_rl.train --config=configs/qwen3_vl_dapo.py:demo \
    --workdir=workdirs/dapo_demo        # the demo's tiny model, CPU
  python -m faithful_rl.train --config=configs/qwen3_vl_dapo.py:runlocal \
    --workdir=/tmp/dapo_local

Arguments (variant=4b|8b, default 8b; hf_dir, data, eval_data, demo,
runlocal): see configs/common.py.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, **common.QWEN3_RECIPE_ARGS)
  c = common.recipe(
      arg, "dapo", family="qwen3_vl", variants=common.QWEN3_VARIANTS
  )
  return common.sized(common.ease_paper(c, arg), arg)
